"""A checkpoint's files, each written and hashed in one pass: tensor files (safetensors) composed in host memory,
and small documents; tensor files read back without a copy.

The tensor files are standard safetensors (the library loads them): an 8-byte header length, a JSON header padded
with spaces to 8 bytes, then the data section in `file_layout` order. A file composed whole in a page-aligned
buffer (`FileImage`, built by checkpoint.HostBuffers) goes to the disk with O_DIRECT: the disk reads the buffer
itself, with no copy into the page cache and no writeback later. For the tiny model's 7.2 MB that took the
writer's CPU for write and fsync from 3.1 to 0.9 ms; for MiniLM's three 91 MB files written at once, from 112 to
39 ms (XXH3 included), in the same wall time. The documents, and every file on a file system that refuses
O_DIRECT, are written buffered, each one's writeback started as soon as it is written (start_writeback), so that
the blocks of all of a checkpoint's files are allocated before the first fsync, whose journal commit then makes
them all durable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.volume import CHECKPOINT_HASH, CHUNK_BYTES, FileBytes, new_hasher

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

# O_DIRECT's unit here: the memory address, the file offset and the length of a direct write are multiples of it
# (a disk's logical block is at most 4096 bytes; where more is asked, the write is refused and goes buffered).
PAGE = 4096
# Hash-then-write granularity: small enough to stay in a core's cache between the two (buffered), and whole
# pages (direct).
_WRITE_SLICE = 1 << 20
# How much of a buffered file is written before the disk is asked to start writing it out (start_writeback).
_WRITE_BEHIND_BYTES = 8 << 20
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere every write is buffered


def file_layout(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The order of a tensor file's data section: larger elements first, then by name, as the safetensors library
    writes it. Every tensor then starts at an offset aligned for its type, with no gap between tensors."""
    return sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))


def safetensors_prefix(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None, where: str) -> bytes:
    """What precedes the data section of a safetensors file of `tensors` (only their dtypes and shapes count): the
    header's length (8 bytes, little-endian) and the JSON header, padded with spaces to a multiple of 8 bytes.
    TypeError, naming `where` and the tensor, for a dtype safetensors cannot hold."""
    header: dict[str, Any] = {}
    offset = 0
    for name in file_layout(tensors):
        tensor = tensors[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{where}: tensor {name} has unsupported dtype {tensor.dtype}")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    if metadata:
        header["__metadata__"] = metadata
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    return len(header_bytes).to_bytes(8, "little") + header_bytes


@dataclass(frozen=True)
class FileImage:
    """A tensor file composed whole in host memory: `data` holds its bytes from the first (header, then data
    section) and starts on a page; `tensors` are views of its data section, into which a capture copies."""

    tensors: dict[str, torch.Tensor]
    data: memoryview


def compose_file_image(
    sources: Mapping[str, torch.Tensor], metadata: dict[str, str] | None, where: str, *, pinned: bool = False
) -> FileImage:
    """An image of a safetensors file for tensors shaped as `sources`: the header filled in, the data section left
    for the caller to copy into. `pinned`: page-locked memory, for copies from a CUDA device."""
    prefix = safetensors_prefix(sources, metadata, where)
    order = file_layout(sources)
    size = len(prefix) + sum(sources[name].nbytes for name in order)
    arena = torch.empty(size + PAGE, dtype=torch.uint8, pin_memory=pinned)
    first = -arena.data_ptr() % PAGE
    image = arena[first : first + size]
    image[: len(prefix)].copy_(torch.frombuffer(bytearray(prefix), dtype=torch.uint8))
    tensors: dict[str, torch.Tensor] = {}
    offset = len(prefix)  # a multiple of 8: every tensor is aligned for its type
    for name in order:
        source = sources[name]
        tensors[name] = image[offset : offset + source.nbytes].view(source.dtype).view(source.shape)
        offset += source.nbytes
    return FileImage(tensors, memoryview(image.numpy()))  # type: ignore[arg-type]


def write_file_image(path: Path, image: FileImage, *, fsync: bool = True, direct: bool = True) -> tuple[str, ...]:
    """Write a composed file (`direct`: with O_DIRECT where the file system takes it), fsync it (unless the caller
    does), and return the hash (volume.CHECKPOINT_HASH) of each of its pieces (volume.CHUNK_BYTES)."""
    return _write_hashed(path, image.data, direct=direct, fsync=fsync)


def write_bytes(path: Path, payload: bytes, *, fsync: bool = False) -> tuple[str, ...]:
    """Write a small file (a JSON document) whole, not fsynced unless asked; its pieces' hashes."""
    return _write_hashed(path, memoryview(payload), direct=False, fsync=fsync)


def _write_hashed(path: Path, data: memoryview, *, direct: bool, fsync: bool) -> tuple[str, ...]:
    """Write `data` into a new file at `path`; the hash of each CHUNK_BYTES piece of it. `data` is a private host
    copy, which no one changes.

    Buffered, each slice is hashed right before it is written, while in cache. Direct, all of it is hashed first and
    then written in one request: the writer thread, at its low priority, then waits for the disk once per file,
    where each 1 MiB request cost it a wake-up, and the training a preempted thread.
    """
    pieces: list[str] = []
    digest, piece_left = new_hasher(CHECKPOINT_HASH), CHUNK_BYTES
    with _NewFile(path, direct=direct) as out:
        whole = out.direct
        for start in range(0, len(data), _WRITE_SLICE):
            part = rest = data[start : start + _WRITE_SLICE]
            while len(rest):
                taken = rest[:piece_left]
                digest.update(taken)
                rest, piece_left = rest[len(taken) :], piece_left - len(taken)
                if piece_left == 0:
                    pieces.append(digest.hexdigest())
                    digest, piece_left = new_hasher(CHECKPOINT_HASH), CHUNK_BYTES
            if not whole:
                out.write(part)
        if whole:
            out.write(data)
        if piece_left < CHUNK_BYTES or not pieces:
            pieces.append(digest.hexdigest())
        out.start_writeback()
        if fsync:
            os.fsync(out.fd)
    return tuple(pieces)


class _NewFile:
    """A file created (or truncated) for writing with raw writes, each written whole or raising: a raw write may
    write part and say so, and a full volume would then leave a short file behind instead of ENOSPC.

    `direct`: opened with O_DIRECT, whole pages written straight from the caller's memory; the file's tail (less
    than a page) and anything direct I/O refuses (EINVAL: an unaligned buffer, a file system without it) go through
    the page cache, the descriptor's O_DIRECT cleared from then on.
    """

    def __init__(self, path: Path, *, direct: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        self.direct = direct and bool(_O_DIRECT)
        if self.direct:
            try:
                self.fd = os.open(path, flags | _O_DIRECT, 0o666)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        if not self.direct:
            self.fd = os.open(path, flags, 0o666)
        self.written = self.flushed = 0

    def __enter__(self) -> _NewFile:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def write(self, data: memoryview) -> None:
        """Append all of `data`, or raise (ENOSPC on a full volume)."""
        if self.direct:
            data = data[self._write_direct(data[: len(data) - len(data) % PAGE]) :]
            if len(data):  # the file's tail, or what direct I/O refused
                self._stop_direct()
        while len(data):
            count = os.write(self.fd, data)
            if count == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data, self.written = data[count:], self.written + count
        if self.written - self.flushed >= _WRITE_BEHIND_BYTES:
            self.start_writeback()

    def start_writeback(self) -> None:
        """Start writing out what went through the page cache since the last call (start_writeback)."""
        if self.written > self.flushed:
            start_writeback(self.fd, self.flushed, self.written - self.flushed)
            self.flushed = self.written

    def _write_direct(self, data: memoryview) -> int:
        """Write as much of `data` (whole pages) as direct I/O takes; the bytes written."""
        done = 0
        while done < len(data):
            try:
                count = os.write(self.fd, data[done:])
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                break
            done += count
            if count == 0 or count % PAGE:  # cut short off a page boundary: the rest cannot go direct
                break
        self.written += done
        self.flushed = self.written  # on the disk already
        return done

    def _stop_direct(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self.direct = False


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these just-written bytes to the disk, without waiting for it.

    POSIX_FADV_DONTNEED on dirty pages starts their writeback (Linux: mm/fadvise.c, WB_SYNC_NONE) and frees them
    from the page cache once clean, as PostgreSQL's pg_flush_data does where it lacks sync_file_range. The disk
    then writes while the rest of the file is hashed and copied, and the final fsync waits for a tail instead of
    the whole file, and a buffered write does not crowd the page cache. The writeback also allocates the bytes'
    blocks (ext4 and XFS delay that until then): done for every file before the first fsync, one journal commit
    holds them all, where an fsync that found blocks still to allocate paid a commit of its own. Durability still
    rests on the fsync alone.
    """
    with contextlib.suppress(OSError, AttributeError):  # not on every platform or file system: only slower
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def tensors_from_safetensors(data: FileBytes, where: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in memory, as views of `data` (no copy); ValueError naming `where`.

    `data` is writable (a bytearray, or a private copy-on-write mapping), so the tensors may be changed in
    place, as the optimizer does with its moments, without touching the file.
    """
    buffer = memoryview(data)
    if len(buffer) < 8:
        raise ValueError(f"{where}: not a safetensors file ({len(buffer)} bytes)")
    start = 8 + int.from_bytes(buffer[:8], "little")
    if start > len(buffer):
        raise ValueError(f"{where}: not a safetensors file (header longer than the file)")
    try:
        header = json.loads(bytes(buffer[8:start]))
    except ValueError as exc:
        raise ValueError(f"{where}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{where}: not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    dtypes = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in header.items():
        try:
            dtype = dtypes[spec["dtype"]]
            shape = [int(n) for n in spec["shape"]]
            begin, end = (start + int(n) for n in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: tensor {name}: bad header entry {spec!r}") from exc
        count = math.prod(shape)
        if not start <= begin <= end <= len(buffer) or end - begin != count * dtype.itemsize:
            raise ValueError(f"{where}: tensor {name}: data offsets do not fit shape {shape} and dtype {dtype}")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif begin % dtype.itemsize:  # unaligned for its type (not written by this trainer): copy it out
            tensors[name] = torch.frombuffer(bytearray(buffer[begin:end]), dtype=dtype).reshape(shape)
        else:
            tensors[name] = torch.frombuffer(data, dtype=dtype, count=count, offset=begin).reshape(shape)
    return tensors
