"""Content hashes of files: a hash per fixed-size chunk, computed on several cores, checked while reading.

A file's entry lists the hash of each `CHUNK_BYTES`-long piece of it, the last one shorter, or one hash of the
whole file: `chunk_bytes` is 0 then and the whole file is one piece. The algorithm is named by the manifest:
checkpoints are hashed with XXH3-128 (manifest format 3), which runs at about 9 GB/s per core here, where sha256
runs at 1-1.8 GB/s: at 2 cores sha256 alone kept a checkpoint's write at 0.54 of `dd` and its verified restore at
0.52 of a cold read (issue 10). The hashes detect corruption (torn writes, bit rot, a file replaced by another);
they are no defence against someone who can write the volume, who could rewrite the manifest too (that is
the job of volume.durable's confinement and the per-run ownership checks). Older checkpoints (formats 1 and 2)
and dataset snapshots, whose content address is their name, use sha256, and still verify.

Pieces are hashed on a shared pool of threads, since both hashes release the GIL on large buffers. Verification
reads each piece on a pool thread and hashes it as it arrives (verify while reading: every byte is read from the
disk once, and the pieces of one file are read and hashed on all cores at once); a verified large file is then
handed on as a private mapping of the same open file, checked unchanged since before the hash.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import xxhash

from trainer.volume.durable import SymlinkRefused, open_file
from trainer.volume.errors import CheckpointInvalid

# 64 MiB pieces: several threads reading pieces of one file at once cost CPU (the kernel's readahead is kept per open
# file): verifying MiniLM's 273 MB (three 90 MB files) took 0.23 CPU-s in 16 MiB pieces, 0.20 in 64 MiB pieces and
# 0.185 in whole files (2 cores, load 5, page cache dropped); 64 MiB still spreads a 440 MB BERT-base weights file
# over 7 threads, where a whole-file hash runs on one.
CHUNK_BYTES = 64 * 1024 * 1024


class Hasher(Protocol):
    def update(self, data: memoryview | bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


HASHES: dict[str, Callable[[], Hasher]] = {"sha256": hashlib.sha256, "xxh3_128": xxhash.xxh3_128}
CHECKPOINT_HASH = "xxh3_128"  # what new checkpoint manifests use (format 3)
_MAP_MIN_BYTES = 1024 * 1024  # verified files this big are kept as the mapping of the file, smaller ones as bytes
_MIN_WORKERS, _MAX_WORKERS = 4, 8

FileBytes = bytearray | mmap.mmap
"""A verified file's content: its bytes (small files) or a private copy-on-write mapping of it (large files)."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a manifest: its path relative to the folder ("/"-separated), size, and content hashes."""

    path: str
    size: int
    digests: tuple[str, ...]  # hex hash of each piece, in file order
    chunk_bytes: int = 0  # length of every piece but the last; 0: one piece, the whole file
    algorithm: str = "sha256"  # a key of HASHES

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
    """The threads that read and hash pieces, started on first use: two per usable core, 4 to 8, because a thread
    waiting for the disk leaves its core to another (2 threads on 2 cores verified MiniLM's 273 MB checkpoint in
    0.24 s, 4 in 0.20 s, as fast as one thread per file did, on the same busy machine)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(_MIN_WORKERS, min(_MAX_WORKERS, 2 * len(os.sched_getaffinity(0))))
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash")
        return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has none of the parent's threads: it starts its own pool when it needs one


os.register_at_fork(after_in_child=_forget_pool)


def new_hasher(algorithm: str) -> Hasher:
    """A fresh hash object of `algorithm` (a key of HASHES); ValueError naming it otherwise."""
    try:
        return HASHES[algorithm]()
    except KeyError:
        raise ValueError(f"unknown hash {algorithm!r} (known: {', '.join(sorted(HASHES))})") from None


def _digest(pieces: Sequence[memoryview], algorithm: str) -> str:
    digest = new_hasher(algorithm)
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def submit_digests(
    parts: Sequence[memoryview | bytes], chunk_bytes: int = CHUNK_BYTES, algorithm: str = CHECKPOINT_HASH
) -> list[Future[str]]:
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
        futures.append(pool.submit(_digest, pieces, algorithm))
    return futures


_READ_BYTES = 1024 * 1024
_buffers = threading.local()


def _hash_range(fd: int, start: int, end: int, algorithm: str) -> str:
    """The hash of bytes [start, end) of an open file, read through this thread's one reused 1 MiB buffer (hashing
    a mapping of the file instead was slower: its page faults cost more than the copy, 0.24 s vs 0.20 s for
    273 MB on the busy 2-core machine)."""
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    digest = new_hasher(algorithm)
    offset = start
    while offset < end:
        count = os.preadv(fd, [view[: min(len(view), end - offset)]], offset)
        if count <= 0:
            break  # the file got shorter: its hash cannot match, and the size check names it
        digest.update(view[:count])
        offset += count
    return digest.hexdigest()


def _submit_spans(fd: int, spans: Sequence[tuple[int, int]], algorithm: str) -> list[Future[str]]:
    pool = hash_pool()
    return [pool.submit(_hash_range, fd, start, end, algorithm) for start, end in spans]


def file_digests(path: Path, chunk_bytes: int = CHUNK_BYTES, algorithm: str = CHECKPOINT_HASH) -> tuple[str, ...]:
    """The hash of each piece of a file on disk, hashed in parallel."""
    with os.fdopen(open_file(path), "rb", buffering=0) as handle:  # no symlink followed
        size = os.fstat(handle.fileno()).st_size
        futures = _submit_spans(handle.fileno(), chunk_spans(size, chunk_bytes), algorithm)
        return tuple(future.result() for future in futures)


def sha256_file(path: Path) -> str:
    """One sha256 of the whole file (format 1 entries, snapshots)."""
    return file_digests(path, 0, "sha256")[0]


class _Verification:
    """One file being verified: opened, checked for size, mapped, its pieces hashing on the pool."""

    def __init__(self, folder: Path, entry: FileEntry) -> None:
        self.entry = entry
        self.path = folder / entry.path
        try:
            self.handle = os.fdopen(open_file(self.path), "rb", buffering=0)  # closed in finish
        except FileNotFoundError as exc:
            raise CheckpointInvalid(f"{self.path}: listed in manifest but missing") from exc
        except SymlinkRefused as exc:
            raise CheckpointInvalid(f"{exc.filename}: a symlink (never followed)") from exc
        except OSError as exc:
            raise CheckpointInvalid(f"{self.path}: unreadable ({exc.strerror or exc})") from exc
        self.futures: list[Future[str]] = []
        try:
            self.before = os.fstat(self.handle.fileno())
            if self.before.st_size != entry.size:
                raise CheckpointInvalid(
                    f"{self.path}: size {self.before.st_size} != {entry.size} in manifest (truncated?)"
                )
            self.futures = _submit_spans(self.handle.fileno(), entry.spans, entry.algorithm)
        except BaseException:
            self.handle.close()
            raise

    def wait(self) -> None:
        for future in self.futures:
            future.exception()

    def finish(self, keep: bool) -> FileBytes | None:
        """The verified content (with `keep`), once every piece matched; CheckpointInvalid naming the file.

        A large file is kept as a private mapping of the same open file, taken after the hash: the second look
        at it costs no disk read (the pages are in the page cache) and no copy, and its size and times are
        checked unchanged since before the hash, so what is loaded is what was verified.
        """
        try:
            try:
                digests = [future.result() for future in self.futures]
                data: FileBytes | None = None
                if keep and self.entry.size >= _MAP_MIN_BYTES:
                    data = mmap.mmap(self.handle.fileno(), 0, access=mmap.ACCESS_COPY)
                elif keep:
                    data = bytearray(self.entry.size)
                    count = os.preadv(self.handle.fileno(), [data], 0) if self.entry.size else 0
                    if count != self.entry.size:
                        raise CheckpointInvalid(f"{self.path}: changed while being verified")
                after = os.fstat(self.handle.fileno())
            except OSError as exc:
                raise CheckpointInvalid(f"{self.path}: unreadable ({exc.strerror or exc})") from exc
        finally:
            self.handle.close()
        changed = (self.before.st_size, self.before.st_mtime_ns, self.before.st_ctime_ns) != (
            after.st_size,
            after.st_mtime_ns,
            after.st_ctime_ns,
        )
        if changed:
            raise CheckpointInvalid(f"{self.path}: changed while being verified")
        spans = self.entry.spans
        for index, (got, expected) in enumerate(zip(digests, self.entry.digests, strict=True)):
            if got != expected:
                where = f"; bytes {spans[index][0]}-{spans[index][1]}, piece {index + 1} of {len(spans)}"
                where = where if len(spans) > 1 else ""
                raise CheckpointInvalid(f"{self.path}: {self.entry.algorithm} does not match manifest (corrupt{where})")
        return data


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
            verification.wait()  # no piece still reads the file once this returns or raises
            verification.handle.close()
