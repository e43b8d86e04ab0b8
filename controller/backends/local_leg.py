"""Supervisor of one local leg: runs the trainer, forwards SIGTERM/SIGINT to it, records how it ended.

`python -m controller.backends.local_leg --exit-file legs/<n>.exit.json --trainer-file legs/<n>.trainer.json
-- python -m trainer train ...` runs in its own session (started by LocalBackend), so it outlives a
crashed worker like a pod outlives a controller restart. A restarted worker cannot wait() for a process
that is not its child; it reads the exit file this supervisor writes atomically when the trainer ends.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from trainer.volume import atomic_write_json

_LOG_TAIL_BYTES = 4096


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

    received: list[int] = []
    child = subprocess.Popen(command)

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
    record: dict[str, object] = {
        "exit_code": returncode if returncode >= 0 else None,
        "signal": -returncode if returncode < 0 else None,
        "signals_received": received,
        "ended_at": time.time(),
        "message": "" if returncode in (0, 75) else last_log_line(args.log_file),
    }
    atomic_write_json(args.exit_file, record)
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.stdout.flush()
    code = main()
    os._exit(code)
