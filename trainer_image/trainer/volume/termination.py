"""The termination message: why the trainer failed, in one line, where its supervisor reads it after the exit.

Kubernetes' container termination message (the file at `terminationMessagePath`,
/dev/termination-log by default, reported as `state.terminated.message`), or a file the local leg supervisor
names. The trainer learns the path from $RELAY_TERMINATION_LOG and writes "<ExceptionType>: <message>" on
exit 1, its own error text on exit 65.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.volume.durable import open_file

TERMINATION_LOG_ENV = "RELAY_TERMINATION_LOG"
TERMINATION_MESSAGE_MAX_BYTES = 4096  # what the kubelet keeps of a termination message


def write_termination_message(message: str, path: str | Path | None = None) -> bool:
    """Write the first line of `message` to `path` (default: $RELAY_TERMINATION_LOG); False when there is no
    path or it is not writable. Written in place, from offset 0, and then cut to length: space a supervisor
    reserved in the file beforehand is reused, so the line gets written even on a full volume."""
    target = path if path is not None else os.environ.get(TERMINATION_LOG_ENV)
    if not target:
        return False
    line = next((part.strip() for part in message.splitlines() if part.strip()), "")
    data = line.encode("utf-8")[: TERMINATION_MESSAGE_MAX_BYTES - 1].decode("utf-8", "ignore").encode() + b"\n"
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a planted link is not written through
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def read_termination_message(path: Path) -> str:
    """The message in a termination-message file (up to a NUL: space reserved but not written), or ''."""
    try:
        with os.fdopen(open_file(path), "rb") as handle:  # no symlink followed: it may lie in a run folder
            data = handle.read(TERMINATION_MESSAGE_MAX_BYTES)
    except OSError:
        return ""
    return data.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
