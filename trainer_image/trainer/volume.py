"""The shared volume's layout and the checkpoint manifest: the one contract between controller and trainer.

Torch-free on purpose: the controller imports this module to read checkpoint state from the volume
(read-only), the trainer imports it to write and verify checkpoints. Nothing here knows what is
inside a checkpoint beyond file names, sizes and sha256 hashes.

Layout (see ARCHITECTURE.md)::

    snapshots/<sha256>/                 dataset snapshot + snapshot.json (written last)
    runs/<namespace>/<name>/
      config.json                       resolved trainer config the legs run with
      progress.json                     machine-readable progress, rewritten atomically
      checkpoints/step-<000000123>/     checkpoint files + manifest.json (written last)
      checkpoints/.tmp-*                in-progress writes; never read, removed on trainer start
      quarantine/<name>.<unix-ms>/      corrupt checkpoints moved aside, with reason.txt
      final/                            finished model + tokenizer + metrics.json + manifest.json
      legs/<n>.json                     what each leg started from and how it ended
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import mmap
import os
import re
import shutil
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SNAPSHOT_MANIFEST_NAME = "snapshot.json"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Files are hashed through one reused buffer this big: small enough to stay in the CPU cache between the
# kernel's copy and the hash (4 MiB fresh buffers were measurably slower), large enough for few system calls.
_HASH_CHUNK = 1024 * 1024
_HASH_WORKERS = 8  # files hashed at once: sha256 is serial per file, so each large file gets its own thread
_MAP_MIN_BYTES = 1024 * 1024  # verified files this big are kept as a mapping of the file, smaller ones as bytes


class ExitCode(enum.IntEnum):
    """The trainer's documented exit codes; Job specs and the workflow classify legs by them."""

    COMPLETE = 0  # training finished, final model written
    FAILED = 1  # an error of the trainer's own (bug, OOM raised as exception, I/O error)
    INVALID_INPUT = 65  # EX_DATAERR: bad config, snapshot, fields, labels or model; do not retry
    PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving a checkpoint; resume next leg


class CheckpointInvalid(Exception):
    """A checkpoint folder that must not be loaded; the message names the file at fault."""


# ---------------------------------------------------------------- paths


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run's folder on the volume."""

    run_dir: Path

    @classmethod
    def for_run(cls, volume_root: Path | str, namespace: str, name: str) -> RunLayout:
        return cls(Path(volume_root) / "runs" / namespace / name)

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.json"

    @property
    def progress_path(self) -> Path:
        return self.run_dir / "progress.json"

    @property
    def history_path(self) -> Path:
        """One JSON line per progress log line and evaluation, appended by every leg (the plot's loss curve)."""
        return self.run_dir / "history.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def quarantine_dir(self) -> Path:
        return self.run_dir / "quarantine"

    @property
    def final_dir(self) -> Path:
        return self.run_dir / "final"

    @property
    def legs_dir(self) -> Path:
        return self.run_dir / "legs"

    def leg_record_path(self, leg: int) -> Path:
        return self.legs_dir / f"{leg}.json"


def snapshot_dir(volume_root: Path | str, content_sha256: str) -> Path:
    return Path(volume_root) / "snapshots" / content_sha256


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def parse_step(dir_name: str) -> int | None:
    """Step number of a checkpoint folder name, or None for anything else (temp dirs, stray files)."""
    match = _STEP_DIR.match(dir_name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- durable writes


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, rename over `path`, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _hash_into(handle: io.FileIO, digest: Any) -> int:
    """Feed the rest of an open file to `digest` through one reused buffer; returns the bytes read."""
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    total = 0
    while count := handle.readinto(buffer):
        digest.update(view[:count])  # hashlib releases the GIL: several files hash at once
        total += count
    return total


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        _hash_into(handle, digest)
    return digest.hexdigest()


FileBytes = bytearray | mmap.mmap
"""A verified file's content: its bytes (small files) or a private copy-on-write mapping of it (large files)."""


def _verify_file(folder: Path, entry: FileEntry, *, keep: bool) -> FileBytes | None:
    """Hash one file against its manifest entry; with `keep`, return the very bytes that were hashed.

    A large file is kept as a private mapping of the same open file, taken after the hash: the second look at
    it costs no disk read (the pages are in the page cache) and no copy, and its size and modification times
    are checked unchanged, so what is loaded is what was verified. Raises CheckpointInvalid naming the file.
    """
    path = folder / entry.path
    try:
        with open(path, "rb", buffering=0) as handle:
            before = os.fstat(handle.fileno())
            if before.st_size != entry.size:
                raise CheckpointInvalid(f"{path}: size {before.st_size} != {entry.size} in manifest (truncated?)")
            data: FileBytes | None = None
            if keep and entry.size < _MAP_MIN_BYTES:
                data = bytearray(entry.size)
                count = 0
                while count < entry.size and (got := handle.readinto(memoryview(data)[count:])):
                    count += got
                digest = hashlib.sha256(memoryview(data)[:count])
            else:
                digest = hashlib.sha256()
                count = _hash_into(handle, digest)
                if keep:
                    data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            after = os.fstat(handle.fileno())
    except FileNotFoundError as exc:
        raise CheckpointInvalid(f"{path}: listed in manifest but missing") from exc
    except OSError as exc:
        raise CheckpointInvalid(f"{path}: unreadable ({exc.strerror or exc})") from exc
    changed = (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )
    if changed or count != entry.size:
        raise CheckpointInvalid(f"{path}: changed while being verified")
    if digest.hexdigest() != entry.sha256:
        raise CheckpointInvalid(f"{path}: sha256 does not match manifest (corrupt)")
    return data


def _verify_files(folder: Path, files: tuple[FileEntry, ...], *, keep: bool) -> dict[str, FileBytes]:
    """Verify every file, several at once (largest first, so that the longest hash starts at once)."""
    ordered = sorted(files, key=lambda entry: -entry.size)
    workers = min(len(ordered), _HASH_WORKERS)
    if workers <= 1:
        results = [_verify_file(folder, entry, keep=keep) for entry in ordered]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
            futures = [pool.submit(_verify_file, folder, entry, keep=keep) for entry in ordered]
            results = [future.result() for future in futures]  # the first failure in size order is raised
    return {entry.path: data for entry, data in zip(ordered, results, strict=True) if data is not None}


# ---------------------------------------------------------------- manifests


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint folder, "/"-separated
    size: int
    sha256: str


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


def _walk_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(TMP_PREFIX)
    )


def write_manifest(
    folder: Path,
    *,
    step: int,
    epoch: int,
    config_hash: str,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    hashes: dict[str, str] | None = None,
) -> CheckpointInfo:
    """Hash every file in `folder`, fsync them, then write manifest.json last (atomically).

    `hashes` may carry sha256s already computed while writing (relative path -> hex), to avoid
    reading the files back; sizes are always taken from the file system.
    """
    entries = []
    for file in _walk_files(folder):
        rel = file.relative_to(folder).as_posix()
        fsync_file(file)
        digest = (hashes or {}).get(rel) or sha256_file(file)
        entries.append(FileEntry(rel, file.stat().st_size, digest))
    created_at = time.time()
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "epoch": epoch,
        "created_at": created_at,
        "config_hash": config_hash,
        "metrics": metrics or {},
        "extra": extra or {},
        "files": [entry.__dict__ for entry in entries],
    }
    atomic_write_json(folder / MANIFEST_NAME, manifest)
    return CheckpointInfo(
        folder, step, epoch, created_at, config_hash, dict(metrics or {}), tuple(entries), extra or {}
    )


def read_checkpoint(folder: Path, *, verify_hashes: bool, required_files: Collection[str] = ()) -> CheckpointInfo:
    """Parse and check a checkpoint folder; raise CheckpointInvalid naming the file at fault.

    Without `verify_hashes` only presence and sizes are checked (cheap: for the controller's
    heartbeats). With it, every file's sha256 is recomputed. `required_files` the manifest must list
    (the loader's needs): a checkpoint written in another format is then invalid (quarantined, the
    previous one used) instead of failing every later leg. The trainer uses `open_verified_checkpoint`,
    which verifies the same way and keeps the bytes it hashed.
    """
    info = _read_manifest(folder, required_files)
    if verify_hashes:
        _verify_files(folder, info.files, keep=False)
    return info


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose every file matched its manifest sha256, with the verified content of each file
    (by manifest path): loading from `contents` reads nothing that was not verified, and nothing twice."""

    info: CheckpointInfo
    contents: dict[str, FileBytes]


def open_verified_checkpoint(folder: Path, *, required_files: Collection[str] = ()) -> VerifiedCheckpoint:
    """read_checkpoint with verification, keeping what was hashed (see _verify_file); CheckpointInvalid if bad."""
    info = _read_manifest(folder, required_files)
    return VerifiedCheckpoint(info, _verify_files(folder, info.files, keep=True))


def _read_manifest(folder: Path, required_files: Collection[str]) -> CheckpointInfo:
    """The manifest, checked against the folder's name, `required_files` and the files' presence and sizes."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointInvalid(f"{manifest_path}: missing (checkpoint incomplete)")
    try:
        manifest = read_json(manifest_path)
        files = tuple(FileEntry(str(e["path"]), int(e["size"]), str(e["sha256"])) for e in manifest["files"])
        step, epoch = int(manifest["step"]), int(manifest["epoch"])
        if manifest.get("format") != MANIFEST_FORMAT:
            raise CheckpointInvalid(f"{manifest_path}: unknown format {manifest.get('format')!r}")
    except CheckpointInvalid:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointInvalid(f"{manifest_path}: unreadable manifest ({exc})") from exc
    expected_step = parse_step(folder.name)
    if expected_step is not None and expected_step != step:
        raise CheckpointInvalid(f"{manifest_path}: says step {step} but folder is {folder.name}")
    if not files:
        raise CheckpointInvalid(f"{manifest_path}: lists no files")
    listed = {entry.path for entry in files}
    for name in required_files:
        if name not in listed:
            raise CheckpointInvalid(f"{folder / name}: required but not in the manifest (another checkpoint format?)")
    for entry in files:
        file = folder / entry.path
        if not file.is_file():
            raise CheckpointInvalid(f"{file}: listed in manifest but missing")
        size = file.stat().st_size
        if size != entry.size:
            raise CheckpointInvalid(f"{file}: size {size} != {entry.size} in manifest (truncated?)")
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


# ---------------------------------------------------------------- finding, quarantining, retention


def list_checkpoint_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) for every step-N folder, oldest first, ordered by the parsed step number."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in checkpoints_dir.iterdir() if p.is_dir()]
    return sorted((step, p) for step, p in found if step is not None)


def quarantine(folder: Path, quarantine_dir: Path, reason: str) -> Path:
    """Move a bad checkpoint aside (never delete evidence) with a reason.txt; return its new path."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = quarantine_dir / f"{folder.name}.{int(time.time() * 1000)}"
    os.replace(folder, target)
    (target / "reason.txt").write_text(reason + "\n", encoding="utf-8")
    fsync_dir(folder.parent)
    fsync_dir(quarantine_dir)
    return target


@dataclass(frozen=True)
class QuarantinedCheckpoint:
    step: int
    path: Path
    reason: str


def find_latest_checkpoint(
    checkpoints_dir: Path,
    *,
    verify_hashes: bool,
    quarantine_dir: Path | None = None,
    required_files: Collection[str] = (),
) -> tuple[CheckpointInfo | None, list[QuarantinedCheckpoint]]:
    """The newest checkpoint that passes verification, newest by parsed step number.

    Invalid ones newer than it are moved to `quarantine_dir` when one is given (the trainer), or
    only reported (the controller, whose mount is read-only). Returns (latest or None, rejected).
    """
    return _newest_valid(
        checkpoints_dir,
        quarantine_dir,
        lambda folder: read_checkpoint(folder, verify_hashes=verify_hashes, required_files=required_files),
    )


def find_latest_verified(
    checkpoints_dir: Path, *, quarantine_dir: Path | None, required_files: Collection[str] = ()
) -> tuple[VerifiedCheckpoint | None, list[QuarantinedCheckpoint]]:
    """find_latest_checkpoint with hashes verified, keeping the verified bytes for loading (the trainer's resume)."""
    return _newest_valid(
        checkpoints_dir, quarantine_dir, lambda folder: open_verified_checkpoint(folder, required_files=required_files)
    )


_Checked = TypeVar("_Checked")


def _newest_valid(
    checkpoints_dir: Path, quarantine_dir: Path | None, check: Callable[[Path], _Checked]
) -> tuple[_Checked | None, list[QuarantinedCheckpoint]]:
    rejected: list[QuarantinedCheckpoint] = []
    for step, folder in reversed(list_checkpoint_dirs(checkpoints_dir)):
        try:
            return check(folder), rejected
        except CheckpointInvalid as exc:
            moved = quarantine(folder, quarantine_dir, str(exc)) if quarantine_dir is not None else folder
            rejected.append(QuarantinedCheckpoint(step, moved, str(exc)))
    return None, rejected


def list_quarantined(quarantine_dir: Path) -> list[QuarantinedCheckpoint]:
    """Every checkpoint moved to quarantine so far, with its recorded reason."""
    if not quarantine_dir.is_dir():
        return []
    result = []
    for folder in sorted(quarantine_dir.iterdir()):
        step = parse_step(folder.name.split(".")[0])
        reason_file = folder / "reason.txt"
        reason = reason_file.read_text(encoding="utf-8").strip() if reason_file.is_file() else "unknown"
        result.append(QuarantinedCheckpoint(step if step is not None else -1, folder, reason))
    return result


def select_for_deletion(
    checkpoints: Iterable[CheckpointInfo],
    *,
    keep_last: int,
    best_metric: str | None = None,
    higher_is_better: bool = True,
) -> list[CheckpointInfo]:
    """Retention: keep the newest `keep_last` and the best by `best_metric`; never the newest one."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    if not ordered:
        return []
    keep = {c.step for c in ordered[-max(1, keep_last) :]}
    scored = [c for c in ordered if best_metric and best_metric in c.metrics]
    if scored:
        sign = 1.0 if higher_is_better else -1.0
        keep.add(max(scored, key=lambda c: (sign * c.metrics[best_metric or ""], c.step)).step)
    keep.add(ordered[-1].step)
    return [c for c in ordered if c.step not in keep]


def remove_stale_temp_dirs(checkpoints_dir: Path) -> list[Path]:
    """Delete half-written `.tmp-*` checkpoint folders left by a killed writer (trainer start only)."""
    removed = []
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# ---------------------------------------------------------------- progress and leg records


def write_progress(layout: RunLayout, progress: dict[str, Any]) -> None:
    atomic_write_json(layout.progress_path, {**progress, "updated_at": time.time()})


def read_progress(layout: RunLayout) -> dict[str, Any] | None:
    """The trainer's last progress report, or None if there is none (or it is being replaced)."""
    try:
        data = read_json(layout.progress_path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- termination message
#
# Why the trainer failed, in one line, where its supervisor reads it after the exit: Kubernetes' container
# termination message (the file at `terminationMessagePath`, /dev/termination-log by default, reported as
# `state.terminated.message`), or a file the local leg supervisor names. The trainer learns the path from
# this environment variable and writes "<ExceptionType>: <message>" on exit 1, its own error text on exit 65.

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
        fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
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
        with open(path, "rb") as handle:
            data = handle.read(TERMINATION_MESSAGE_MAX_BYTES)
    except OSError:
        return ""
    return data.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


# ---------------------------------------------------------------- dataset snapshots
#
# snapshots/<sha256>/data/           datasets.DatasetDict.save_to_disk with splits "train" and "eval"
# snapshots/<sha256>/snapshot.json   written last: content hash, source, fields, rows, file list
# A folder without a valid snapshot.json is not a snapshot (half-written); it is never read.

SNAPSHOT_DATA_DIR = "data"
SNAPSHOT_SPLITS = ("train", "eval")


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    content_sha256: str
    source: dict[str, Any]
    fields: list[str]
    rows: dict[str, int]
    files: tuple[FileEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "content_sha256": self.content_sha256,
            "source": self.source,
            "fields": self.fields,
            "rows": self.rows,
        }


def write_snapshot_manifest(
    folder: Path, *, content_sha256: str, source: dict[str, Any], fields: list[str], rows: dict[str, int]
) -> SnapshotInfo:
    """Hash and fsync every file under folder/data, then write snapshot.json last (atomically)."""
    entries = []
    for file in _walk_files(folder):
        if file.name == SNAPSHOT_MANIFEST_NAME:
            continue
        fsync_file(file)
        entries.append(FileEntry(file.relative_to(folder).as_posix(), file.stat().st_size, sha256_file(file)))
    manifest = {
        "format": MANIFEST_FORMAT,
        "content_sha256": content_sha256,
        "source": source,
        "fields": fields,
        "rows": rows,
        "created_at": time.time(),
        "files": [entry.__dict__ for entry in entries],
    }
    atomic_write_json(folder / SNAPSHOT_MANIFEST_NAME, manifest)
    return SnapshotInfo(folder, content_sha256, source, fields, rows, tuple(entries))


def read_snapshot(folder: Path, *, verify_hashes: bool) -> SnapshotInfo:
    """Parse and check a snapshot folder; raise CheckpointInvalid naming the file at fault."""
    manifest_path = folder / SNAPSHOT_MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointInvalid(f"{manifest_path}: missing (not a snapshot, or not finished)")
    try:
        manifest = read_json(manifest_path)
        files = tuple(FileEntry(str(e["path"]), int(e["size"]), str(e["sha256"])) for e in manifest["files"])
        info = SnapshotInfo(
            folder,
            str(manifest["content_sha256"]),
            dict(manifest["source"]),
            [str(f) for f in manifest["fields"]],
            {str(k): int(v) for k, v in dict(manifest["rows"]).items()},
            files,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointInvalid(f"{manifest_path}: unreadable snapshot manifest ({exc})") from exc
    for entry in files:
        file = folder / entry.path
        if not file.is_file():
            raise CheckpointInvalid(f"{file}: listed in snapshot manifest but missing")
        if file.stat().st_size != entry.size:
            raise CheckpointInvalid(f"{file}: size differs from snapshot manifest (truncated?)")
        if verify_hashes and sha256_file(file) != entry.sha256:
            raise CheckpointInvalid(f"{file}: sha256 does not match snapshot manifest (corrupt)")
    return info
