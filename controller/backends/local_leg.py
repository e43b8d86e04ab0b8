"""Supervisor of one local leg: runs the trainer, forwards SIGTERM/SIGINT to it, records how it ended.

`python -m controller.backends.local_leg --exit-file legs/<n>.exit.json --trainer-file legs/<n>.trainer.json
-- python -m trainer train ...` runs in its own session (started by LocalBackend), so it outlives a
crashed worker like a pod outlives a controller restart. A restarted worker cannot wait() for a process
that is not its child; it reads the exit file this supervisor writes atomically when the trainer ends.

The trainer's reason for failing comes from its termination message (`legs/<n>.termination-log`, named to
it by $RELAY_TERMINATION_LOG, as Kubernetes names /dev/termination-log), else from the last line of its log.
Both files' space is reserved before the trainer starts, so that on a volume the trainer filled the reason
and the exit record are still written: the leg is recorded as failed with ENOSPC, not lost.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from trainer.volume import (
    TERMINATION_LOG_ENV,
    TERMINATION_MESSAGE_MAX_BYTES,
    TMP_PREFIX,
    atomic_write_json,
    fsync_dir,
    read_termination_message,
)

_LOG_TAIL_BYTES = 4096
_MESSAGE_MAX_CHARS = 1000
_EXIT_RECORD_RESERVE = 16 * 1024  # bytes held for the exit record (a message of 1000 characters fits many times)


def process_start_time(pid: int) -> int | None:
    """Start time of a live (non-zombie) process in clock ticks since boot, from /proc; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # zombie or dead: exited, not yet reaped
        return None
    return int(fields[19])


def last_log_line(log_file: Path | None) -> str:
    """The last non-empty line of a leg's log (the trainer's one-line error), or ''."""
    if log_file is None or not log_file.is_file():
        return ""
    with open(log_file, "rb") as handle:
        handle.seek(max(0, log_file.stat().st_size - _LOG_TAIL_BYTES))
        lines = [line.strip() for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def termination_file_for(exit_file: Path) -> Path:
    """legs/<n>.exit.json -> legs/<n>.termination-log"""
    return exit_file.with_name(exit_file.name.removesuffix(".json").removesuffix(".exit") + ".termination-log")


class ReservedRecord:
    """An exit record whose disk space is taken at launch: a temp file in the record's folder, allocated now;
    at the end the record is written into it in place, cut to length, fsynced and renamed over `path`.
    Neither the write nor the rename needs a free block, so a full volume cannot stop the record.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
        self.fd: int | None = None
        try:
            fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            print(f"local_leg: cannot reserve {self.tmp} ({exc}); the exit record is written at the end", flush=True)
            return
        try:
            os.posix_fallocate(fd, 0, _EXIT_RECORD_RESERVE)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            print(f"local_leg: cannot reserve {self.tmp} ({exc}); the exit record is written at the end", flush=True)
            return
        self.fd = fd

    def write(self, record: dict[str, object]) -> None:
        data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")
        fd, self.fd = self.fd, None
        if fd is None or len(data) > _EXIT_RECORD_RESERVE:
            if fd is not None:
                os.close(fd)
            atomic_write_json(self.path, record)  # no reservation: the ordinary way, with the space there is
            return
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)


def reserve_termination_file(path: Path) -> None:
    """Create the trainer's termination-message file with its space allocated (NULs: nothing written yet)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, 0, TERMINATION_MESSAGE_MAX_BYTES)
    except OSError:
        pass  # the trainer writes it without a reservation, if there is room
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.backends.local_leg")
    parser.add_argument("--exit-file", required=True, type=Path)
    parser.add_argument("--trainer-file", required=True, type=Path)
    parser.add_argument("--log-file", type=Path, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a trainer command is required after --")

    exit_record = ReservedRecord(args.exit_file)
    termination_file = termination_file_for(args.exit_file)
    reserve_termination_file(termination_file)
    received: list[int] = []
    child = subprocess.Popen(command, env={**os.environ, TERMINATION_LOG_ENV: str(termination_file)})

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    atomic_write_json(
        args.trainer_file, {"pid": child.pid, "start_time": process_start_time(child.pid), "command": command}
    )
    returncode = child.wait()
    message = ""
    if returncode not in (0, 75):
        message = read_termination_message(termination_file) or last_log_line(args.log_file)
    exit_record.write(
        {
            "exit_code": returncode if returncode >= 0 else None,
            "signal": -returncode if returncode < 0 else None,
            "signals_received": received,
            "ended_at": time.time(),
            "message": message[:_MESSAGE_MAX_CHARS],
        }
    )
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.stdout.flush()
    code = main()
    os._exit(code)
