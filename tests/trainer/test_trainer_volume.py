"""Unit tests of the torch-free volume module: manifests, verification, newest-checkpoint search, quarantine,
retention, temp-dir cleanup, progress and snapshot manifests."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.volume import (
    CheckpointInfo,
    CheckpointInvalid,
    RunLayout,
    atomic_write_json,
    checkpoint_dir_name,
    find_latest_checkpoint,
    list_checkpoint_dirs,
    list_quarantined,
    open_verified_checkpoint,
    parse_step,
    read_checkpoint,
    read_progress,
    read_snapshot,
    remove_stale_temp_dirs,
    select_for_deletion,
    write_manifest,
    write_progress,
    write_snapshot_manifest,
)


def make_checkpoint(checkpoints: Path, step: int, *, loss: float = 1.0, payload: bytes = b"weights") -> Path:
    folder = checkpoints / checkpoint_dir_name(step)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload * 10)
    (folder / "sub").mkdir()
    (folder / "sub" / "state.json").write_text('{"a": 1}')
    write_manifest(folder, step=step, epoch=0, config_hash="abc", metrics={"loss": loss}, extra={"batch_in_epoch": 3})
    return folder


def test_checkpoint_names_parse_as_numbers() -> None:
    assert checkpoint_dir_name(123) == "step-000000123"
    assert parse_step("step-000000123") == 123
    assert parse_step("step-1000") == 1000
    for other in (".tmp-step-000000001.12", "step-", "step-12a", "final", "step-000000001.1700000000"):
        assert parse_step(other) is None


def test_step_1000_is_newer_than_step_500(tmp_path: Path) -> None:
    # Names that sort the other way as strings: "step-1000" < "step-500".
    for name, step in (("step-500", 500), ("step-1000", 1000), ("step-000000999", 999)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "w.bin").write_bytes(b"x")
        write_manifest(folder, step=step, epoch=0, config_hash="h")
    assert [step for step, _ in list_checkpoint_dirs(tmp_path)] == [500, 999, 1000]
    latest, rejected = find_latest_checkpoint(tmp_path, verify_hashes=True)
    assert latest is not None and latest.step == 1000 and rejected == []


def test_manifest_round_trip_lists_every_file(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path, 7, loss=0.5)
    info = read_checkpoint(folder, verify_hashes=True)
    assert info.step == 7 and info.metrics == {"loss": 0.5} and info.extra == {"batch_in_epoch": 3}
    assert sorted(entry.path for entry in info.files) == ["model.safetensors", "sub/state.json"]
    assert info.total_bytes == 70 + len('{"a": 1}')
    assert info.to_json()["bytes"] == info.total_bytes


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: (f / "manifest.json").unlink(), "manifest.json: missing"),
        (lambda f: (f / "manifest.json").write_text("{"), "manifest.json: unreadable manifest"),
        (lambda f: (f / "model.safetensors").write_bytes(b"weights"), "model.safetensors: size 7 != 70"),
        (
            lambda f: (f / "model.safetensors").write_bytes(b"WEIGHTS" * 10),
            "model.safetensors: xxh3_128 does not match",
        ),
        (lambda f: (f / "sub" / "state.json").unlink(), "state.json: listed in manifest but missing"),
    ],
    ids=["no manifest", "bad manifest", "truncated", "corrupt", "file missing"],
)
def test_damaged_checkpoint_is_rejected_naming_the_file(tmp_path: Path, damage, expected: str) -> None:
    folder = make_checkpoint(tmp_path, 5)
    damage(folder)
    with pytest.raises(CheckpointInvalid, match=expected):
        read_checkpoint(folder, verify_hashes=True)


def test_manifest_step_must_match_folder_name(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path, 5)
    folder.rename(tmp_path / "step-000000006")
    with pytest.raises(CheckpointInvalid, match="says step 5 but folder is step-000000006"):
        read_checkpoint(tmp_path / "step-000000006", verify_hashes=False)


def test_size_only_check_misses_corruption_that_hashes_catch(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path, 5)
    (folder / "model.safetensors").write_bytes(b"WEIGHTS" * 10)
    assert read_checkpoint(folder, verify_hashes=False).step == 5  # the controller's cheap check
    with pytest.raises(CheckpointInvalid):
        read_checkpoint(folder, verify_hashes=True)


def test_bad_newer_checkpoints_are_quarantined_and_the_previous_used(tmp_path: Path) -> None:
    checkpoints, quarantine = tmp_path / "checkpoints", tmp_path / "quarantine"
    make_checkpoint(checkpoints, 10)
    (make_checkpoint(checkpoints, 20) / "model.safetensors").write_bytes(b"x")
    (make_checkpoint(checkpoints, 30) / "manifest.json").unlink()
    latest, rejected = find_latest_checkpoint(checkpoints, verify_hashes=True, quarantine_dir=quarantine)
    assert latest is not None and latest.step == 10
    assert [r.step for r in rejected] == [30, 20]
    assert [step for step, _ in list_checkpoint_dirs(checkpoints)] == [10]
    moved = {q.step: q.reason for q in list_quarantined(quarantine)}
    assert set(moved) == {20, 30}
    assert "size 1 != 70" in moved[20] and "manifest.json: missing" in moved[30]


def test_checkpoint_of_another_format_is_quarantined_not_loaded(tmp_path: Path) -> None:
    """A verified checkpoint lacking a file this trainer's loader needs (written by an older format)."""
    checkpoints, quarantine = tmp_path / "checkpoints", tmp_path / "quarantine"
    make_checkpoint(checkpoints, 10)
    newer = make_checkpoint(checkpoints, 20)
    (newer / "sub" / "state.json").unlink()
    write_manifest(newer, step=20, epoch=0, config_hash="abc")  # a complete manifest, in an older layout
    required = ("model.safetensors", "sub/state.json")
    latest, rejected = find_latest_checkpoint(
        checkpoints, verify_hashes=True, quarantine_dir=quarantine, required_files=required
    )
    assert latest is not None and latest.step == 10
    assert [r.step for r in rejected] == [20]
    assert "sub/state.json: required but not in the manifest" in rejected[0].reason


def test_without_quarantine_dir_nothing_moves(tmp_path: Path) -> None:
    """The controller reads a read-only mount: it reports bad checkpoints but never moves them."""
    make_checkpoint(tmp_path, 10)
    (make_checkpoint(tmp_path, 20) / "manifest.json").unlink()
    latest, rejected = find_latest_checkpoint(tmp_path, verify_hashes=False)
    assert latest is not None and latest.step == 10 and [r.step for r in rejected] == [20]
    assert [step for step, _ in list_checkpoint_dirs(tmp_path)] == [10, 20]


def test_no_checkpoints_at_all(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path / "absent", verify_hashes=True) == (None, [])


def test_stale_temp_dirs_are_removed_and_checkpoints_kept(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 4)
    (tmp_path / ".tmp-step-000000008.123.456").mkdir()
    (tmp_path / ".tmp-step-000000008.123.456" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".tmp-delete-step-000000002.9").mkdir()
    removed = remove_stale_temp_dirs(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-delete-step-000000002.9", ".tmp-step-000000008.123.456"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000004"]


def info(step: int, loss: float | None = None) -> CheckpointInfo:
    return CheckpointInfo(Path(f"step-{step}"), step, 0, 0.0, "h", {} if loss is None else {"loss": loss}, (), {})


def test_retention_keeps_last_k_and_the_best() -> None:
    checkpoints = [info(100, 0.9), info(200, 0.1), info(300, 0.5), info(400, 0.6), info(500, 0.7)]
    deleted = select_for_deletion(checkpoints, keep_last=2, best_metric="loss", higher_is_better=False)
    assert [c.step for c in deleted] == [100, 300]
    tied = [info(100, 0.5), info(200, 0.1), info(300, 0.1), info(400, 0.6), info(500, 0.7)]
    deleted = select_for_deletion(tied, keep_last=1, best_metric="loss", higher_is_better=False)
    kept = {c.step for c in tied} - {c.step for c in deleted}
    assert kept == {200, 500}  # of equal values the earliest is the best (the trainer's EvalTracker agrees)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.sets(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=30),
    keep_last=st.integers(min_value=0, max_value=5),
    data=st.data(),
)
def test_retention_never_deletes_the_newest(steps: set[int], keep_last: int, data: st.DataObject) -> None:
    checkpoints = [info(s, data.draw(st.one_of(st.none(), st.floats(0, 10)))) for s in steps]
    deleted = {c.step for c in select_for_deletion(checkpoints, keep_last=keep_last, best_metric="loss")}
    newest_first = sorted(steps, reverse=True)
    assert newest_first[0] not in deleted
    assert not deleted & set(newest_first[: max(1, keep_last)])
    scored = [c for c in checkpoints if "loss" in c.metrics]
    if scored:
        best = max(scored, key=lambda c: (c.metrics["loss"], -c.step))  # of equal values, the earliest
        assert best.step not in deleted
    assert len(deleted) >= len(steps) - max(1, keep_last) - 1


def test_atomic_json_and_progress(tmp_path: Path) -> None:
    layout = RunLayout.for_run(tmp_path, "ns", "run")
    assert read_progress(layout) is None
    write_progress(layout, {"state": "running", "step": 3})
    progress = read_progress(layout)
    assert progress is not None and progress["step"] == 3 and "updated_at" in progress
    atomic_write_json(layout.run_dir / "x.json", [1, 2])
    assert json.loads((layout.run_dir / "x.json").read_text()) == [1, 2]
    assert sorted(p.name for p in layout.run_dir.iterdir()) == ["progress.json", "x.json"]  # no temp files left


def test_snapshot_manifest_round_trip_and_damage(tmp_path: Path) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "part.arrow").write_bytes(b"rows" * 5)
    written = write_snapshot_manifest(
        tmp_path, content_sha256="c" * 64, source={"kind": "csv"}, fields=["text", "label"], rows={"train": 3}
    )
    read = read_snapshot(tmp_path, verify_hashes=True)
    assert read.rows == {"train": 3} and read.files == written.files and read.content_sha256 == "c" * 64
    (tmp_path / "data" / "train" / "part.arrow").write_bytes(b"ROWS" * 5)
    with pytest.raises(CheckpointInvalid, match=r"part\.arrow: sha256 does not match snapshot manifest"):
        read_snapshot(tmp_path, verify_hashes=True)


def test_shared_modules_do_not_import_torch() -> None:
    """The controller imports trainer.volume and trainer.config; they must stay torch-free."""
    code = "import sys, trainer, trainer.volume, trainer.config, trainer.errors; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def test_large_files_are_listed_per_chunk_and_a_byte_in_a_later_chunk_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Manifest format 3: the manifest names its hash (XXH3-128) and lists one per chunk_bytes piece, each equal
    to the xxhash library's over that piece; a flipped byte in the third piece is caught, named by file and byte
    range, and the checkpoint is not used."""
    from trainer.volume import hashing, manifests

    monkeypatch.setattr(manifests, "CHUNK_BYTES", 4096)  # small pieces, so a small file has several
    folder = tmp_path / checkpoint_dir_name(7)
    folder.mkdir()
    payload = bytes(range(256)) * 41  # 10496 bytes: pieces of 4096, 4096 and 2304
    (folder / "model.safetensors").write_bytes(payload)
    written = write_manifest(folder, step=7, epoch=0, config_hash="h")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == 3 and manifest["hash"] == "xxh3_128" and manifest["chunk_bytes"] == 4096
    expected = [xxhash.xxh3_128(payload[i : i + 4096]).hexdigest() for i in range(0, len(payload), 4096)]
    assert manifest["files"] == [{"path": "model.safetensors", "size": len(payload), "xxh3_128_chunks": expected}]
    assert read_checkpoint(folder, verify_hashes=True).files == written.files
    assert hashing.file_digests(folder / "model.safetensors", 4096) == tuple(expected)

    damaged = bytearray(payload)
    damaged[9000] ^= 0x01  # inside the third piece, same size
    (folder / "model.safetensors").write_bytes(bytes(damaged))
    assert read_checkpoint(folder, verify_hashes=False).step == 7  # sizes alone cannot tell
    with pytest.raises(
        CheckpointInvalid,
        match=r"model\.safetensors: xxh3_128 does not match manifest \(corrupt; bytes 8192-10496, piece 3 of 3\)",
    ):
        read_checkpoint(folder, verify_hashes=True)
    with pytest.raises(CheckpointInvalid, match=r"piece 3 of 3"):
        open_verified_checkpoint(folder)


def test_a_format_2_checkpoint_with_chunk_sha256s_still_loads_and_is_still_checked(tmp_path: Path) -> None:
    """Checkpoints written before format 3 (one sha256 per 64 MiB piece, no "hash" key) verify and load, and a
    changed byte is still caught, by sha256."""
    folder = tmp_path / checkpoint_dir_name(5)
    folder.mkdir()
    weights = bytes(range(256)) * 8192  # 2 MiB: kept as a mapping of the file
    (folder / "model.safetensors").write_bytes(weights)
    files = [
        {"path": "model.safetensors", "size": len(weights), "sha256_chunks": [hashlib.sha256(weights).hexdigest()]}
    ]
    manifest = {"format": 2, "chunk_bytes": 64 << 20, "step": 5, "epoch": 0, "created_at": 1.0, "config_hash": "h"}
    atomic_write_json(folder / "manifest.json", manifest | {"metrics": {}, "extra": {}, "files": files})

    verified = open_verified_checkpoint(folder, required_files=["model.safetensors"])
    assert verified.info.step == 5 and bytes(verified.contents["model.safetensors"]) == weights
    assert verified.info.files[0].algorithm == "sha256"

    (folder / "model.safetensors").write_bytes(weights[:-1] + b"\x00")  # was 0xff
    with pytest.raises(CheckpointInvalid, match=r"model\.safetensors: sha256 does not match manifest \(corrupt\)$"):
        read_checkpoint(folder, verify_hashes=True)


def test_a_manifest_naming_an_unknown_hash_is_refused_by_name(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path, 6)
    manifest = json.loads((folder / "manifest.json").read_text())
    atomic_write_json(folder / "manifest.json", manifest | {"hash": "md4"})
    with pytest.raises(CheckpointInvalid, match=r"manifest\.json: unknown hash 'md4' \(known: sha256, xxh3_128\)"):
        read_checkpoint(folder, verify_hashes=False)


def test_a_format_1_checkpoint_still_loads_and_is_still_checked(tmp_path: Path) -> None:
    """Checkpoints written before per-chunk hashes (one whole-file sha256 per file) verify and load."""
    folder = tmp_path / checkpoint_dir_name(3)
    folder.mkdir()
    weights = bytes(range(256)) * 8192  # 2 MiB: kept as a mapping of the file
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "trainer_state.json").write_text('{"step": 3}')
    files = [
        {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in (("model.safetensors", weights), ("trainer_state.json", b'{"step": 3}'))
    ]
    manifest = {"format": 1, "step": 3, "epoch": 0, "created_at": 1.0, "config_hash": "h", "metrics": {}}
    atomic_write_json(folder / "manifest.json", manifest | {"extra": {}, "files": files})

    verified = open_verified_checkpoint(folder, required_files=["model.safetensors", "trainer_state.json"])
    assert verified.info.step == 3 and bytes(verified.contents["model.safetensors"]) == weights
    assert bytes(verified.contents["trainer_state.json"]) == b'{"step": 3}'
    latest, rejected = find_latest_checkpoint(tmp_path, verify_hashes=True)
    assert latest is not None and latest.step == 3 and not rejected

    (folder / "model.safetensors").write_bytes(weights[:-1] + b"\x00")  # was 0xff
    with pytest.raises(CheckpointInvalid, match=r"model\.safetensors: sha256 does not match manifest \(corrupt\)$"):
        read_checkpoint(folder, verify_hashes=True)


def test_a_manifest_with_the_wrong_number_of_chunk_hashes_is_refused(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path, 4)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][0]["xxh3_128_chunks"].append("0" * 32)
    atomic_write_json(folder / "manifest.json", manifest)
    with pytest.raises(CheckpointInvalid, match=r"manifest\.json: unreadable manifest .*2 chunk hashes for 70 bytes"):
        read_checkpoint(folder, verify_hashes=False)
