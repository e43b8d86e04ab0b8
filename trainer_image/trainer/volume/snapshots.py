"""Dataset snapshots: a folder written once, made to exist by snapshot.json written last, verified before reuse.

snapshots/<sha256>/data/           datasets.DatasetDict.save_to_disk with splits "train" and "eval"
snapshots/<sha256>/snapshot.json   written last: content hash, source, fields, rows, file list
A folder without a valid snapshot.json is not a snapshot (half-written); it is never read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.volume.durable import atomic_write_json, fsync_file, read_json
from trainer.volume.errors import CheckpointInvalid
from trainer.volume.hashing import FileEntry, sha256_file
from trainer.volume.manifests import WHOLE_FILE_FORMAT, check_entries, entry_json, parse_entry, walk_files

SNAPSHOT_MANIFEST_NAME = "snapshot.json"
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
    for file in walk_files(folder):
        if file.name == SNAPSHOT_MANIFEST_NAME:
            continue
        fsync_file(file)
        entries.append(FileEntry(file.relative_to(folder).as_posix(), file.stat().st_size, (sha256_file(file),)))
    manifest = {
        "format": WHOLE_FILE_FORMAT,
        "content_sha256": content_sha256,
        "source": source,
        "fields": fields,
        "rows": rows,
        "created_at": time.time(),
        "files": [entry_json(entry) for entry in entries],
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
        files = tuple(parse_entry(raw, 0) for raw in manifest["files"])
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
    sizes = check_entries(manifest_path, files)
    for entry in files:
        file = folder / entry.path
        if sizes[entry.path] != entry.size:
            raise CheckpointInvalid(f"{file}: size differs from snapshot manifest (truncated?)")
        if verify_hashes and sha256_file(file) != entry.digests[0]:
            raise CheckpointInvalid(f"{file}: sha256 does not match snapshot manifest (corrupt)")
    return info
