"""Dataset snapshots: content-addressed, verified before reuse, never half-written; bad data named in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from controller.snapshot import InvalidDataset, snapshot_dataset, write_rows_file
from controller.spec import DatasetSpec
from trainer.volume import SNAPSHOT_MANIFEST_NAME, read_snapshot

TEXTS = [f"review number {i} {'good' if i % 2 else 'bad'}" for i in range(50)]
LABELS = [i % 2 for i in range(50)]


def _csv(volume: Path, name: str = "data/reviews.csv", texts: list[str] = TEXTS, labels: list = LABELS) -> str:
    write_rows_file(volume / name, texts, labels, "csv")
    return name


def test_demo_snapshot_is_real_labelled_reviews_and_reused_after_verification(tmp_path: Path):
    spec = DatasetSpec(source="demo", max_rows=300, eval_fraction=0.2, split_seed=3)
    info, reused = snapshot_dataset(tmp_path, spec, 2)
    assert not reused and info.rows == {"train": 240, "eval": 60}
    assert info.path == tmp_path / "snapshots" / info.content_sha256
    data = datasets.load_from_disk(str(info.path / "data"))
    assert set(data) == {"train", "eval"} and data["train"].column_names == ["text", "label"]
    assert set(data["train"]["label"]) | set(data["eval"]["label"]) == {0, 1}
    assert all(len(text) > 10 for text in data["eval"]["text"])
    assert not set(data["train"]["text"]) & set(data["eval"]["text"])  # held out means held out
    again, reused = snapshot_dataset(tmp_path, spec, 2)
    assert reused and again.content_sha256 == info.content_sha256
    other, _ = snapshot_dataset(tmp_path, spec.model_copy(update={"split_seed": 4}), 2)
    assert other.content_sha256 != info.content_sha256  # the split is part of the content


def test_same_rows_from_csv_and_jsonl_are_one_snapshot(tmp_path: Path):
    write_rows_file(tmp_path / "a.jsonl", TEXTS, LABELS, "jsonl")
    from_csv, _ = snapshot_dataset(tmp_path, DatasetSpec(source="csv", path=_csv(tmp_path)), 2)
    from_jsonl, reused = snapshot_dataset(tmp_path, DatasetSpec(source="jsonl", path="a.jsonl"), 2)
    assert reused and from_jsonl.content_sha256 == from_csv.content_sha256


def test_parquet_source(tmp_path: Path):
    datasets.Dataset.from_dict({"sentence": TEXTS, "y": LABELS}).to_parquet(str(tmp_path / "d.parquet"))
    spec = DatasetSpec(source="parquet", path="d.parquet", text_field="sentence", label_field="y", eval_fraction=0.1)
    info, _ = snapshot_dataset(tmp_path, spec, 2)
    assert info.rows == {"train": 45, "eval": 5} and info.fields == ["sentence", "y"]


def test_a_snapshot_is_what_save_to_disk_writes_and_the_controller_never_imports_datasets_or_pandas(tmp_path: Path):
    """The controller writes the DatasetDict with pyarrow alone (importing `datasets` cost it 57 MB for the rest of
    its life; pandas, which pa.array and to_numpy import, 36 MB more): the files are save_to_disk's, byte for byte
    but for state.json's fingerprint (a random cache key there, derived from the content here), and load_from_disk
    reads them. The demo source (built from Python lists) and a csv file (read by pyarrow) both stay clear of both."""
    spec = DatasetSpec(source="csv", path=_csv(tmp_path), eval_fraction=0.3, split_seed=5)
    spec_json, volume = spec.model_dump_json(), str(tmp_path)
    probe = (
        "import sys; from pathlib import Path; from controller.snapshot import snapshot_dataset; "
        "from controller.spec import DatasetSpec; "
        f"info, _ = snapshot_dataset(Path({volume!r}), DatasetSpec.model_validate_json({spec_json!r}), 2); "
        f"snapshot_dataset(Path({volume!r}), DatasetSpec(source='demo', max_rows=200), 2); "
        "print(info.path, sorted({'datasets', 'pandas'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    path, imported = result.stdout.split(maxsplit=1)
    assert imported.strip() == "[]", f"the snapshots imported {imported.strip()}"
    data = Path(path) / "data"
    loaded = datasets.load_from_disk(str(data))
    parts = {name: loaded[name].data.table for name in ("train", "eval")}
    assert {name: table.num_rows for name, table in parts.items()} == {"train": 35, "eval": 15}
    reference = tmp_path / "reference"
    datasets.DatasetDict({name: datasets.Dataset(table) for name, table in parts.items()}).save_to_disk(str(reference))
    written = sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    for relative in written:
        if relative.name != "state.json":
            assert (data / relative).read_bytes() == (reference / relative).read_bytes(), relative
    for split in ("train", "eval"):
        ours, theirs = (json.loads((root / split / "state.json").read_text()) for root in (data, reference))
        assert {**ours, "_fingerprint": None} == {**theirs, "_fingerprint": None}


def test_corrupt_snapshot_is_moved_aside_and_rewritten(tmp_path: Path):
    spec = DatasetSpec(source="csv", path=_csv(tmp_path))
    info, _ = snapshot_dataset(tmp_path, spec, 2)
    arrow = next((info.path / "data" / "train").glob("*.arrow"))
    raw = bytearray(arrow.read_bytes())
    raw[-10] ^= 0xFF  # same size, different bytes: only a hash check notices
    arrow.write_bytes(bytes(raw))
    fresh, reused = snapshot_dataset(tmp_path, spec, 2)
    assert not reused and fresh.content_sha256 == info.content_sha256
    read_snapshot(fresh.path, verify_hashes=True)  # verifies again
    aside = [p for p in (tmp_path / "snapshots").iterdir() if p.name.startswith(".tmp-bad-")]
    assert len(aside) == 1 and "sha256 does not match" in (aside[0] / "reason.txt").read_text()


def test_half_written_snapshot_is_never_used(tmp_path: Path):
    spec = DatasetSpec(source="csv", path=_csv(tmp_path))
    info, _ = snapshot_dataset(tmp_path, spec, 2)
    (info.path / SNAPSHOT_MANIFEST_NAME).unlink()  # as if the writer died before its manifest
    fresh, reused = snapshot_dataset(tmp_path, spec, 2)
    assert not reused and (fresh.path / SNAPSHOT_MANIFEST_NAME).is_file()


@pytest.mark.parametrize(
    ("texts", "labels", "spec_overrides", "message"),
    [
        (
            TEXTS,
            LABELS,
            {"text_field": "review"},
            "dataset.textField: column 'review' not in the dataset (columns: text, label)",
        ),
        (TEXTS, LABELS, {"label_field": "stars"}, "dataset.labelField: column 'stars' not in the dataset"),
        (TEXTS, [5, *LABELS[1:]], {}, "dataset.labelField: label 5 outside [0, 2) (spec.training.numLabels=2)"),
        (TEXTS, [-1, *LABELS[1:]], {}, "dataset.labelField: label -1 outside [0, 2)"),
        (TEXTS, ["pos"] * 50, {}, "dataset.labelField: column 'label' holds string, not integer class ids"),
        (TEXTS, [None, *LABELS[1:]], {}, "dataset.labelField: column 'label' has 1 missing labels"),
        (TEXTS[:1], LABELS[:1], {}, "dataset: 1 rows; at least 2 are needed"),
    ],
)
def test_bad_data_is_named_in_one_line(tmp_path: Path, texts: list, labels: list, spec_overrides: dict, message: str):
    spec = DatasetSpec(source="csv", path=_csv(tmp_path, texts=texts, labels=labels), **spec_overrides)
    with pytest.raises(InvalidDataset) as info:
        snapshot_dataset(tmp_path, spec, 2)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not [p for p in (tmp_path / "snapshots").iterdir()]  # nothing written


def test_missing_and_unreadable_files(tmp_path: Path):
    with pytest.raises(InvalidDataset, match=r"dataset.path 'nope.csv': no such file under the volume"):
        snapshot_dataset(tmp_path, DatasetSpec(source="csv", path="nope.csv"), 2)
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(InvalidDataset, match=r"dataset.path 'junk.parquet': not readable as parquet"):
        snapshot_dataset(tmp_path, DatasetSpec(source="parquet", path="junk.parquet"), 2)
    os.symlink("/etc/hostname", tmp_path / "escape.csv")
    with pytest.raises(InvalidDataset, match=r"dataset.path 'escape.csv': escapes the volume"):
        snapshot_dataset(tmp_path, DatasetSpec(source="csv", path="escape.csv"), 2)


def test_hub_source_offline_is_a_clear_error(tmp_path: Path):
    """The hub path is kept; offline it must fail with one line naming dataset.name (no network here)."""
    code = (
        "from pathlib import Path; from controller.snapshot import snapshot_dataset, InvalidDataset\n"
        "from controller.spec import DatasetSpec\n"
        "try:\n"
        f"    snapshot_dataset(Path({str(tmp_path)!r}), DatasetSpec(source='hub', name='relay-test/none'), 2)\n"
        "except InvalidDataset as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.startswith("dataset.name 'relay-test/none': cannot load from the hub"), result.stderr[-500:]
