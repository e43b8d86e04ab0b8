"""Checkpoint manifests: written last into a checkpoint folder, they make it exist; read and verified before use.

manifest.json lists every file's size and content hashes: the hash of each `chunk_bytes`-long piece of a file,
so that a file is hashed on every core and verified while it is read (see hashing.py). Format 3 (written now)
names its algorithm (`"hash": "xxh3_128"`) and lists `"<hash>_chunks"` per file; format 2 is the same with
sha256 (`"sha256_chunks"`, no `"hash"`), format 1 holds one `"sha256"` per file. Both older formats still load.
`"metrics"` holds numbers about the state it saved: the training loss, and the eval metrics (eval_loss, accuracy,
f1_macro) when that step was evaluated during training (issue 15); a manifest without them loads as before.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.volume.durable import atomic_write_json, fsync_file, read_json
from trainer.volume.errors import CheckpointInvalid
from trainer.volume.hashing import (
    CHECKPOINT_HASH,
    CHUNK_BYTES,
    HASHES,
    FileBytes,
    FileEntry,
    chunk_spans,
    file_digests,
    verify_files,
)
from trainer.volume.layout import TMP_PREFIX, parse_step

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 3  # chunk hashes of the algorithm the manifest names
SHA256_CHUNKS_FORMAT = 2  # chunk sha256s: checkpoints written before format 3
WHOLE_FILE_FORMAT = 1  # one sha256 per file: older checkpoints, and dataset snapshots


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint whose manifest parsed (and, if asked, whose files verified)."""

    path: Path
    step: int
    epoch: int
    created_at: float
    config_hash: str
    metrics: dict[str, float]
    files: tuple[FileEntry, ...]
    extra: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_json(self) -> dict[str, Any]:
        """Summary for status and queries (no file list)."""
        return {
            "path": str(self.path),
            "step": self.step,
            "epoch": self.epoch,
            "created_at": self.created_at,
            "config_hash": self.config_hash,
            "metrics": dict(self.metrics),
            "bytes": self.total_bytes,
        }


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose every file matched its manifest hashes, with the verified content of each file
    (by manifest path): loading from `contents` reads nothing that was not verified, and nothing twice."""

    info: CheckpointInfo
    contents: dict[str, FileBytes]


def walk_files(folder: Path) -> list[Path]:
    """The files a manifest lists: everything under `folder` but the manifest and temp files, sorted."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(TMP_PREFIX)
    )


def check_entries(manifest_path: Path, files: Sequence[FileEntry]) -> dict[str, int]:
    """CheckpointInvalid unless every entry is a plain name inside the manifest's folder (`a` or `a/b`, never
    absolute, empty, `.` or `..`), listed once, and a regular file there that is not a symlink: a manifest is
    data the run's pod can write, and it must not make a reader hash or load anything outside (issue 11). Returns
    each entry's size on disk, from the same lstat."""
    sizes: dict[str, int] = {}
    for entry in files:
        parts = entry.path.split("/")
        if entry.path in sizes or any(part in ("", ".", "..") or "\\" in part for part in parts):
            raise CheckpointInvalid(f"{manifest_path}: entry {entry.path!r} is not a plain name inside the folder")
        file = manifest_path.parent / entry.path
        try:
            found = os.lstat(file)
        except OSError:
            raise CheckpointInvalid(f"{file}: listed in manifest but missing") from None
        if stat.S_ISLNK(found.st_mode):
            raise CheckpointInvalid(f"{file}: a symlink (never followed)")
        if not stat.S_ISREG(found.st_mode):
            raise CheckpointInvalid(f"{file}: listed in manifest but not a file")
        sizes[entry.path] = found.st_size
    return sizes


def entry_json(entry: FileEntry) -> dict[str, Any]:
    """A file's line in a manifest: `"<hash>_chunks"` (formats 2 and 3), or `"sha256"` for a whole-file hash."""
    if entry.chunk_bytes:
        return {"path": entry.path, "size": entry.size, f"{entry.algorithm}_chunks": list(entry.digests)}
    if entry.algorithm != "sha256":
        raise ValueError(f"{entry.path}: whole-file hashes are sha256, not {entry.algorithm}")
    return {"path": entry.path, "size": entry.size, "sha256": entry.digests[0]}


def parse_entry(raw: Mapping[str, Any], chunk_bytes: int, algorithm: str = "sha256") -> FileEntry:
    """A manifest's file line (KeyError/TypeError/ValueError when malformed); chunk_bytes 0 for whole-file hashes."""
    path, size = str(raw["path"]), int(raw["size"])
    if not chunk_bytes:
        return FileEntry(path, size, (str(raw["sha256"]),))
    digests = tuple(str(d) for d in raw[f"{algorithm}_chunks"])
    if len(digests) != len(chunk_spans(size, chunk_bytes)):
        raise ValueError(f"{path}: {len(digests)} chunk hashes for {size} bytes in chunks of {chunk_bytes}")
    return FileEntry(path, size, digests, chunk_bytes, algorithm)


def write_manifest(
    folder: Path,
    *,
    step: int,
    epoch: int,
    config_hash: str,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    hashes: Mapping[str, tuple[str, ...]] | None = None,
    fsynced: Collection[str] = (),
) -> CheckpointInfo:
    """Hash every file in `folder`, fsync them, then write manifest.json last (atomically).

    `hashes` may carry the chunk hashes (CHECKPOINT_HASH, pieces of CHUNK_BYTES) already computed while writing,
    by relative path, to avoid reading those files back; sizes are always taken from the file system. Files in
    `fsynced` (relative paths) were fsynced by the caller after their last write and are not fsynced again.
    """
    manifest, info = compose_manifest(
        folder,
        step=step,
        epoch=epoch,
        config_hash=config_hash,
        metrics=metrics,
        extra=extra,
        hashes=hashes,
        fsynced=fsynced,
    )
    atomic_write_json(folder / MANIFEST_NAME, manifest)
    return info


def compose_manifest(
    folder: Path,
    *,
    step: int,
    epoch: int,
    config_hash: str,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    hashes: Mapping[str, tuple[str, ...]] | None = None,
    fsynced: Collection[str] = (),
) -> tuple[dict[str, Any], CheckpointInfo]:
    """The manifest of the files in `folder` (as write_manifest, which writes it), not yet written: for a caller
    that writes it inside a folder no one sees yet and makes it durable with the other files, before publishing
    the folder by a rename (the checkpoint writer). Files in `fsynced` are fsynced by the caller."""
    entries = []
    for file in walk_files(folder):
        rel = file.relative_to(folder).as_posix()
        if rel not in fsynced:
            fsync_file(file)
        digests = (hashes or {}).get(rel) or file_digests(file, CHUNK_BYTES, CHECKPOINT_HASH)
        entries.append(FileEntry(rel, file.stat().st_size, tuple(digests), CHUNK_BYTES, CHECKPOINT_HASH))
    created_at = time.time()
    manifest = {
        "format": MANIFEST_FORMAT,
        "hash": CHECKPOINT_HASH,
        "chunk_bytes": CHUNK_BYTES,
        "step": step,
        "epoch": epoch,
        "created_at": created_at,
        "config_hash": config_hash,
        "metrics": metrics or {},
        "extra": extra or {},
        "files": [entry_json(entry) for entry in entries],
    }
    return manifest, CheckpointInfo(
        folder, step, epoch, created_at, config_hash, dict(metrics or {}), tuple(entries), extra or {}
    )


def add_manifest_metrics(folder: Path, metrics: Mapping[str, float]) -> None:
    """Add `metrics` to the manifest of the complete checkpoint `folder` (rewritten atomically, files untouched).

    For an evaluation that finishes after its step was saved (a leg stopped during it, the next one redid it):
    its checkpoint then carries the metrics like one saved after the evaluation. CheckpointInvalid if the
    manifest is missing or unreadable.
    """
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = read_json(manifest_path)
        recorded = dict(manifest.get("metrics") or {})
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise CheckpointInvalid(f"{manifest_path}: unreadable manifest ({exc})") from exc
    manifest["metrics"] = recorded | {str(k): float(v) for k, v in metrics.items()}
    atomic_write_json(manifest_path, manifest)


def read_checkpoint(folder: Path, *, verify_hashes: bool, required_files: Collection[str] = ()) -> CheckpointInfo:
    """Parse and check a checkpoint folder; raise CheckpointInvalid naming the file at fault.

    Without `verify_hashes` only presence and sizes are checked (cheap: for the controller's
    heartbeats). With it, every file's hashes are recomputed. `required_files` the manifest must list
    (the loader's needs): a checkpoint written in another format is then invalid (quarantined, the
    previous one used) instead of failing every later leg. The trainer uses `open_verified_checkpoint`,
    which verifies the same way and keeps the bytes it hashed.
    """
    info = _read_manifest(folder, required_files)
    if verify_hashes:
        verify_files(folder, info.files, keep=False)
    return info


def open_verified_checkpoint(folder: Path, *, required_files: Collection[str] = ()) -> VerifiedCheckpoint:
    """read_checkpoint with verification, keeping what was hashed (see hashing.py); CheckpointInvalid if bad."""
    info = _read_manifest(folder, required_files)
    return VerifiedCheckpoint(info, verify_files(folder, info.files, keep=True))


def _read_manifest(folder: Path, required_files: Collection[str]) -> CheckpointInfo:
    """The manifest, checked against the folder's name, `required_files` and the files' presence and sizes."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointInvalid(f"{manifest_path}: missing (checkpoint incomplete)")
    try:
        manifest = read_json(manifest_path)
        version = manifest.get("format")
        if version not in (WHOLE_FILE_FORMAT, SHA256_CHUNKS_FORMAT, MANIFEST_FORMAT):
            raise CheckpointInvalid(f"{manifest_path}: unknown format {version!r}")
        algorithm = str(manifest["hash"]) if version == MANIFEST_FORMAT else "sha256"
        if algorithm not in HASHES:
            raise CheckpointInvalid(f"{manifest_path}: unknown hash {algorithm!r} (known: {', '.join(sorted(HASHES))})")
        chunk_bytes = int(manifest["chunk_bytes"]) if version != WHOLE_FILE_FORMAT else 0
        if version != WHOLE_FILE_FORMAT and chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes {chunk_bytes} is not positive")
        files = tuple(parse_entry(raw, chunk_bytes, algorithm) for raw in manifest["files"])
        step, epoch = int(manifest["step"]), int(manifest["epoch"])
    except CheckpointInvalid:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointInvalid(f"{manifest_path}: unreadable manifest ({exc})") from exc
    expected_step = parse_step(folder.name)
    if expected_step is not None and expected_step != step:
        raise CheckpointInvalid(f"{manifest_path}: says step {step} but folder is {folder.name}")
    if not files:
        raise CheckpointInvalid(f"{manifest_path}: lists no files")
    sizes = check_entries(manifest_path, files)
    listed = {entry.path for entry in files}
    for name in required_files:
        if name not in listed:
            raise CheckpointInvalid(f"{folder / name}: required but not in the manifest (another checkpoint format?)")
    for entry in files:
        if sizes[entry.path] != entry.size:
            file = folder / entry.path
            raise CheckpointInvalid(f"{file}: size {sizes[entry.path]} != {entry.size} in manifest (truncated?)")
    return CheckpointInfo(
        folder,
        step,
        epoch,
        float(manifest.get("created_at", 0.0)),
        str(manifest.get("config_hash", "")),
        {str(k): float(v) for k, v in dict(manifest.get("metrics", {})).items()},
        files,
        dict(manifest.get("extra", {})),
    )
