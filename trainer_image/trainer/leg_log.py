"""The leg's own copy of its output on the volume: `runs/<ns>/<name>/legs/<n>.log`, kept after its pod is gone.

On Kubernetes a finished run's leg Jobs and pods are deleted, and `kubectl logs` with them; so a trainer started
with $RELAY_LEG (the Job sets it) tees every line it writes to stdout and stderr (its progress and checkpoint
lines, warnings, a traceback) to that file, which `relay logs RUN` prints. Locally the leg's supervisor already
writes the same file from the trainer's pipes (controller/backends/local_leg.py), so nothing is teed there.

Size-capped: at LEG_LOG_MAX_BYTES the file becomes `<n>.log.1` (replacing the one before) and a new one starts,
so the newest 5 to 10 MiB of a leg are kept. Opened without following a symlink (trainer.volume.durable): a
symlink a run's pod planted at `legs/<n>.log` is refused, the tee stays off and the leg goes on (its output still
reaches the container log). A failed write (a full volume) turns the tee off too; it never stops training.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path
from typing import TextIO

from trainer.volume import RunLayout
from trainer.volume.durable import SymlinkRefused, open_dir

LEG_ENV = "RELAY_LEG"
LEG_LOG_MAX_BYTES = 5 * 2**20  # per file; with <n>.log.1 at most twice this is kept
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


class LegLog:
    """Appends text to legs/<n>.log through a held fd of the legs folder, rotating to <n>.log.1 at the cap."""

    def __init__(self, path: Path, rotated: Path, max_bytes: int = LEG_LOG_MAX_BYTES) -> None:
        if rotated.parent != path.parent:
            raise ValueError(f"{rotated}: the rotated leg log must be beside {path}")
        self.path = path
        self.rotated = rotated
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._dir_fd = open_dir(path.parent, create=True)
        try:
            self._fd: int | None = self._open()
        except BaseException:
            os.close(self._dir_fd)
            raise
        self.size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        try:
            return os.open(self.path.name, _FLAGS, 0o644, dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SymlinkRefused(errno.ELOOP, "the leg log is a symlink (never followed)", str(self.path)) from None
            raise type(exc)(exc.errno, exc.strerror, str(self.path)) from None

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        with self._lock:
            if self._fd is None or not data:
                return
            try:
                if self.size and self.size + len(data) > self.max_bytes:
                    os.close(self._fd)
                    self._fd = None
                    os.replace(self.path.name, self.rotated.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
                    self._fd = self._open()
                    self.size = 0
                os.write(self._fd, data)
                self.size += len(data)
            except OSError as exc:
                self._off(exc)

    def _off(self, exc: OSError) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        if sys.__stderr__ is not None:  # the process's own stderr: not through the tee
            sys.__stderr__.write(f"relay trainer: leg log {self.path} no longer written: {exc}\n")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None
            os.close(self._dir_fd)


class _Tee:
    """A text stream that writes to `stream` and to the leg log (everything else is the stream's own)."""

    def __init__(self, stream: TextIO, leg_log: LegLog) -> None:
        self._stream = stream
        self._leg_log = leg_log

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        self._leg_log.write(text)
        return written

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def tee_leg_log(run_dir: Path, leg: str | None = None) -> LegLog | None:
    """Tee this process's stdout and stderr to `legs/<leg>.log` of `run_dir` (leg: $RELAY_LEG when None).

    Call before logging is set up, so the log handlers write through the tee. None when no leg number is given,
    or the file cannot be opened (a symlink, an unwritable folder): said on stderr, and the leg goes on.
    """
    leg = os.environ.get(LEG_ENV, "") if leg is None else leg
    if not leg.isdigit():
        return None
    layout = RunLayout(Path(os.path.abspath(run_dir)))
    path = layout.leg_log_path(int(leg))
    try:
        leg_log = LegLog(path, layout.leg_log_rotated_path(int(leg)))
    except OSError as exc:
        print(f"relay trainer: leg log {path} not kept: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return None
    sys.stdout = _Tee(sys.stdout, leg_log)  # type: ignore[assignment]  # a TextIO in all that is used
    sys.stderr = _Tee(sys.stderr, leg_log)  # type: ignore[assignment]
    return leg_log
