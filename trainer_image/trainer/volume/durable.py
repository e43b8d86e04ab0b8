"""Writes that survive a crash and never follow a symlink: fsync of files and folders, JSON replaced atomically.

Every folder on the way to a file is opened one name at a time from `/` with O_NOFOLLOW (a dir fd per step),
the file itself with O_NOFOLLOW, and a temp file is made inside its folder with O_EXCL: a symlink that a run's
own pod planted in its run folder (`legs`, `config.json`, `.tmp-config.json.<pid>`) makes the write fail with
SymlinkRefused, never lands in another folder (issue 11). Callers pass resolved paths (the controller resolves
the volume root, the trainer its run folder), so any symlink left in a path was planted below the root.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from trainer.volume.layout import TMP_PREFIX

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SymlinkRefused(OSError):
    """A path on the volume passes through a symlink (or names one); the message names the path at fault."""


def _refused(path: Path, what: str) -> SymlinkRefused:
    return SymlinkRefused(errno.ELOOP, f"{what} (symlinks on the volume are never followed)", str(path))


def _open_component(parent_fd: int, name: str, path: Path, create: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
    with suppress(FileExistsError):  # made by a concurrent writer: opened below like any other folder
        os.mkdir(name, dir_fd=parent_fd)
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def open_dir(path: Path, *, create: bool = False) -> int:
    """An O_RDONLY fd of folder `path`, reached without following any symlink (made when `create`)."""
    path = Path(os.path.abspath(path))
    fd = os.open("/", _DIR_FLAGS)
    walked = Path("/")
    try:
        for name in path.parts[1:]:
            walked = walked / name
            try:
                next_fd = _open_component(fd, name, walked, create)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(walked):
                    raise _refused(walked, "a folder on the way is a symlink") from None
                raise type(exc)(exc.errno, exc.strerror, str(walked)) from None
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def opened_dir(path: Path, *, create: bool = False) -> Iterator[int]:
    fd = open_dir(path, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_in(dir_fd: int, path: Path, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """An fd of file `path`, whose folder is open as `dir_fd`, opened with `flags`; no symlink followed there."""
    try:
        return os.open(path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refused(path, "the file is a symlink") from None
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None


def open_file(path: Path, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """An fd of file `path` opened with `flags`, no symlink followed on the way or at the end."""
    with opened_dir(path.parent) as dir_fd:
        return _open_in(dir_fd, path, flags, mode)


def fsync_dir(path: Path) -> None:
    with opened_dir(path) as fd:
        os.fsync(fd)


def fsync_file(path: Path) -> None:
    fsync_files(path.parent, [path.name])


def fsync_files(folder: Path, names: Iterable[str]) -> None:
    """fsync the files `names` of `folder`, the folder reached once (no symlink followed, none at the names)."""
    with opened_dir(folder) as dir_fd:
        for name in names:
            fd = _open_in(dir_fd, folder / name)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def json_document(data: Any) -> str:
    """The text of a JSON file the volume holds (manifests, records): indented, keys sorted, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def atomic_write_json(path: Path, data: Any, *, durable: bool = True) -> None:
    """Write JSON to a temp file made (O_EXCL) in the same folder, fsync, rename over `path`, fsync the folder.

    A symlink at `path` is replaced, not followed (rename swaps the name); one at the temp name is removed.
    `durable=False`: no fsync, for a report rewritten every few seconds (progress.json): readers still see the
    old document or the new one, never part of one, and a crash loses at most the last reports.
    """
    text = json_document(data)
    tmp = f"{TMP_PREFIX}{path.name}.{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with opened_dir(path.parent, create=True) as dir_fd:
        try:
            fd = os.open(tmp, flags, 0o666, dir_fd=dir_fd)
        except FileExistsError:
            # A crashed writer's leftover (container pids repeat) or a planted link: unlink the name itself.
            os.unlink(tmp, dir_fd=dir_fd)
            fd = os.open(tmp, flags, 0o666, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        if durable:
            os.fsync(dir_fd)


def read_json(path: Path) -> Any:
    """The JSON document at `path`, read without following a symlink (SymlinkRefused, an OSError, if one is met)."""
    with os.fdopen(open_file(path), encoding="utf-8") as handle:
        return json.load(handle)
