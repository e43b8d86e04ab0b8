"""Content hashes of files: sha256 per fixed-size chunk, computed on several cores, checked while reading.

A file's entry lists the sha256 of each `CHUNK_BYTES`-long piece of it, the last one shorter (manifest format
2), or one sha256 of the whole file (format 1 manifests, dataset snapshots): `chunk_bytes` is 0 then and the
whole file is one piece. Pieces are hashed on a shared pool of threads, since hashlib releases the GIL on
buffers over 2 KiB: one file's hash costs size / (sha256 speed x cores) instead of size / sha256 speed (sha256
runs at about 1.8 GB/s per core here, slower than the disk's cold read).

Verification maps the file (private, copy-on-write) and hashes the mapping: hashing is the read, so the bytes
are read from the disk once, by the hashing threads, and a verified large file is handed on as that mapping
(no second read, no copy); a file changed while it was verified is caught by its size and times.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from trainer.volume.errors import CheckpointInvalid

# 16 MiB pieces: a 90 MB file (MiniLM's weights, or one AdamW moment) splits into 6, so two cores stay busy to
# the end of a checkpoint of three such files; 64 MiB pieces left one core idle for the last third.
CHUNK_BYTES = 16 * 1024 * 1024
_MAP_MIN_BYTES = 1024 * 1024  # verified files this big are kept as the mapping of the file, smaller ones as bytes
_MAX_WORKERS = 8

FileBytes = bytearray | mmap.mmap
"""A verified file's content: its bytes (small files) or a private copy-on-write mapping of it (large files)."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a manifest: its path relative to the folder ("/"-separated), size, and content hashes."""

    path: str
    size: int
    digests: tuple[str, ...]  # sha256 hex of each piece, in file order
    chunk_bytes: int = 0  # length of every piece but the last; 0: one piece, the whole file

    @property
    def spans(self) -> list[tuple[int, int]]:
        return chunk_spans(self.size, self.chunk_bytes)


def chunk_spans(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, end) of each piece of a file of `size` bytes; one piece when chunk_bytes is 0 or the file fits."""
    if chunk_bytes <= 0 or size <= chunk_bytes:
        return [(0, size)]
    return [(start, min(start + chunk_bytes, size)) for start in range(0, size, chunk_bytes)]


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def hash_pool() -> ThreadPoolExecutor:
    """The threads that hash pieces: one per usable core (at most 8), started on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = min(_MAX_WORKERS, len(os.sched_getaffinity(0)))
            _pool = ThreadPoolExecutor(max_workers=max(2, workers), thread_name_prefix="sha256")
        return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has none of the parent's threads: it starts its own pool when it needs one


os.register_at_fork(after_in_child=_forget_pool)


def _digest(pieces: Sequence[memoryview]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def submit_digests(parts: Sequence[memoryview | bytes], chunk_bytes: int = CHUNK_BYTES) -> list[Future[str]]:
    """Start hashing the bytes that `parts` hold end to end (a file about to be written), piece by piece.

    The parts must not change until every future is done; the pieces' digests come out in file order.
    """
    views = [memoryview(part).cast("B") for part in parts]
    offsets, total = [], 0
    for view in views:
        offsets.append(total)
        total += len(view)
    pool = hash_pool()
    futures = []
    for start, end in chunk_spans(total, chunk_bytes):
        pieces = [
            view[max(start, offset) - offset : min(end, offset + len(view)) - offset]
            for view, offset in zip(views, offsets, strict=True)
            if offset < end and offset + len(view) > start
        ]
        futures.append(pool.submit(_digest, pieces))
    return futures


def _submit_spans(data: memoryview, spans: Sequence[tuple[int, int]]) -> list[Future[str]]:
    pool = hash_pool()
    return [pool.submit(_digest, [data[start:end]]) for start, end in spans]


def file_digests(path: Path, chunk_bytes: int = CHUNK_BYTES) -> tuple[str, ...]:
    """The sha256 of each piece of a file on disk, hashed in parallel from a mapping of it."""
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return (hashlib.sha256().hexdigest(),)
        # Not closed here: a pool thread may still hold its slice for an instant after its result is set.
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    futures = _submit_spans(memoryview(mapping), chunk_spans(size, chunk_bytes))
    return tuple(future.result() for future in futures)


def sha256_file(path: Path) -> str:
    """One sha256 of the whole file (format 1 entries, snapshots)."""
    return file_digests(path, 0)[0]


class _Verification:
    """One file being verified: opened, checked for size, mapped, its pieces hashing on the pool."""

    def __init__(self, folder: Path, entry: FileEntry) -> None:
        self.entry = entry
        self.path = folder / entry.path
        try:
            self.handle = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed in finish)
        except FileNotFoundError as exc:
            raise CheckpointInvalid(f"{self.path}: listed in manifest but missing") from exc
        except OSError as exc:
            raise CheckpointInvalid(f"{self.path}: unreadable ({exc.strerror or exc})") from exc
        self.futures: list[Future[str]] = []
        self.mapping: mmap.mmap | None = None
        try:
            self.before = os.fstat(self.handle.fileno())
            if self.before.st_size != entry.size:
                raise CheckpointInvalid(
                    f"{self.path}: size {self.before.st_size} != {entry.size} in manifest (truncated?)"
                )
            if entry.size:
                self.mapping = mmap.mmap(self.handle.fileno(), 0, access=mmap.ACCESS_COPY)
            view = memoryview(self.mapping) if self.mapping is not None else memoryview(b"")
            self.futures = _submit_spans(view, entry.spans)
        except OSError as exc:
            self.handle.close()
            raise CheckpointInvalid(f"{self.path}: unreadable ({exc.strerror or exc})") from exc
        except BaseException:
            self.handle.close()
            raise

    def wait(self) -> None:
        for future in self.futures:
            future.exception()

    def finish(self, keep: bool) -> FileBytes | None:
        """The verified content (with `keep`), once every piece matched; CheckpointInvalid naming the file."""
        try:
            digests = [future.result() for future in self.futures]
            after = os.fstat(self.handle.fileno())
        finally:
            self.handle.close()
        changed = (self.before.st_size, self.before.st_mtime_ns, self.before.st_ctime_ns) != (
            after.st_size,
            after.st_mtime_ns,
            after.st_ctime_ns,
        )
        if changed:
            raise CheckpointInvalid(f"{self.path}: changed while being verified")
        if len(digests) != len(self.entry.digests):
            raise CheckpointInvalid(f"{self.path}: manifest lists {len(self.entry.digests)} hashes for {len(digests)}")
        spans = self.entry.spans
        for index, (got, expected) in enumerate(zip(digests, self.entry.digests, strict=True)):
            if got != expected:
                where = f"; bytes {spans[index][0]}-{spans[index][1]}, piece {index + 1} of {len(spans)}"
                raise CheckpointInvalid(
                    f"{self.path}: sha256 does not match manifest (corrupt{where if len(spans) > 1 else ''})"
                )
        if not keep:
            return None
        if self.mapping is None:
            return bytearray()
        if self.entry.size < _MAP_MIN_BYTES:
            return bytearray(self.mapping)
        return self.mapping


def verify_files(folder: Path, files: Sequence[FileEntry], *, keep: bool) -> dict[str, FileBytes]:
    """Verify every file, all of their pieces at once on the pool (largest file first); with `keep`, return the
    very bytes that were hashed, by manifest path. The first bad file in size order is raised."""
    started: list[_Verification] = []
    try:
        for entry in sorted(files, key=lambda entry: -entry.size):
            started.append(_Verification(folder, entry))
        contents = {}
        for verification in started:
            data = verification.finish(keep)
            if data is not None:
                contents[verification.entry.path] = data
        return contents
    finally:
        for verification in started:
            verification.wait()  # no piece still reads a mapping once this returns or raises
            verification.handle.close()
