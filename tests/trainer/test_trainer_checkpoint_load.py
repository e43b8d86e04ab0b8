"""Loading a checkpoint from the bytes that were verified: safetensors parsed in memory (same tensors as the
safetensors library reads), nothing unverified loaded, and the file never written through the loaded tensors."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

from trainer import checkpoint as ckpt
from trainer import checkpoint_files
from trainer.volume import CheckpointInvalid, find_latest_verified, write_manifest


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(600, 512, generator=generator),  # 1.2 MB, first: a view of the mapped file
        "half": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "counts": torch.arange(7, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "odd": torch.arange(3, dtype=torch.int8),  # 3 bytes: writers put it after every wider type
    }


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as the trainer does: composed in one buffer, then written whole."""
    image = checkpoint_files.compose_file_image(tensors, metadata, path.name)
    for name, tensor in tensors.items():
        image.tensors[name].copy_(tensor)
    checkpoint_files.write_file_image(path, image)


def write_checkpoint_of(folder: Path, step: int, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True)
    write_tensor_file(folder / ckpt.MODEL_FILE, tensors)
    (folder / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
    write_manifest(folder, step=step, epoch=0, config_hash="h")


@pytest.mark.parametrize("writer", ["trainer", "safetensors library"])
def test_tensors_parsed_from_memory_equal_the_library_load(tmp_path: Path, writer: str) -> None:
    path = tmp_path / "t.safetensors"
    tensors = sample_tensors()
    if writer == "trainer":
        write_tensor_file(path, tensors, {"format": "pt"})
    else:
        save_file(tensors, str(path), {"format": "pt"})
    parsed = checkpoint_files.tensors_from_safetensors(bytearray(path.read_bytes()), path)
    expected = load_file(str(path))
    assert parsed.keys() == expected.keys() == tensors.keys()
    for name, tensor in expected.items():
        assert parsed[name].dtype == tensor.dtype and parsed[name].shape == tensor.shape, name
        assert torch.equal(parsed[name], tensor), name


def test_a_tensor_stored_unaligned_for_its_type_is_copied_out_equal(tmp_path: Path) -> None:
    """Neither this trainer nor the safetensors library writes one, but a file in name order may hold one: a float
    after 3 bytes of int8."""
    header = {
        "a_odd": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
        "b_float": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = bytearray(
        len(raw).to_bytes(8, "little") + raw + bytes([1, 2, 3]) + torch.tensor([1.5, -2.0]).numpy().tobytes()
    )
    parsed = checkpoint_files.tensors_from_safetensors(data, tmp_path / "t.safetensors")
    assert torch.equal(parsed["a_odd"], torch.tensor([1, 2, 3], dtype=torch.int8))
    assert torch.equal(parsed["b_float"], torch.tensor([1.5, -2.0]))


def test_a_malformed_safetensors_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file"):
        checkpoint_files.tensors_from_safetensors(bytearray(b"\xff" * 16), path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    data = bytearray(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor w: data offsets do not fit shape"):
        checkpoint_files.tensors_from_safetensors(data, path)


def test_resume_loads_the_verified_bytes_and_never_writes_the_file(tmp_path: Path) -> None:
    checkpoints, quarantine = tmp_path / "checkpoints", tmp_path / "quarantine"
    tensors = sample_tensors()
    write_checkpoint_of(checkpoints / "step-000000001", 1, tensors)
    newer = checkpoints / "step-000000002"
    write_checkpoint_of(newer, 2, {name: t + 1 if t.is_floating_point() else t for name, t in tensors.items()})
    weights = bytearray((newer / ckpt.MODEL_FILE).read_bytes())
    weights[len(weights) // 2] ^= 1  # one flipped bit, same size: only the hash can tell
    (newer / ckpt.MODEL_FILE).write_bytes(weights)

    verified, rejected = find_latest_verified(
        checkpoints, quarantine_dir=quarantine, required_files=ckpt.REQUIRED_FILES[:1]
    )
    assert verified is not None and verified.info.step == 1
    assert [r.step for r in rejected] == [2] and "xxh3_128 does not match manifest" in rejected[0].reason
    path = verified.info.path / ckpt.MODEL_FILE
    assert isinstance(verified.contents[ckpt.MODEL_FILE], mmap.mmap)  # large files: no copy, no second read
    on_disk = path.read_bytes()
    loaded = checkpoint_files.tensors_from_safetensors(verified.contents[ckpt.MODEL_FILE], path)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    loaded["big"].add_(1.0)  # the optimizer updates its moments in place: the checkpoint must not change
    del loaded, verified
    assert path.read_bytes() == on_disk
    manifest = json.loads((path.parent / "manifest.json").read_text())
    entry = next(e for e in manifest["files"] if e["path"] == ckpt.MODEL_FILE)
    assert [xxhash.xxh3_128(on_disk).hexdigest()] == entry["xxh3_128_chunks"]  # 1.2 MB: one 64 MiB piece


def test_a_file_changed_while_verified_is_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer changing the file between its hash and its mapping (none should exist): rejected, named."""
    from trainer import volume
    from trainer.volume import hashing

    checkpoints = tmp_path / "checkpoints"
    write_checkpoint_of(checkpoints / "step-000000001", 1, sample_tensors())
    real_hash = hashing._submit_spans
    weights = checkpoints / "step-000000001" / ckpt.MODEL_FILE

    def hash_then_rewrite(data, spans, algorithm):  # type: ignore[no-untyped-def]
        pieces = real_hash(data, spans, algorithm)
        for piece in pieces:
            piece.result()
        with open(weights, "ab") as other:  # another writer appends after the hash
            other.write(b"\0")
        return pieces

    monkeypatch.setattr(hashing, "_submit_spans", hash_then_rewrite)
    with pytest.raises(CheckpointInvalid, match=r"model\.safetensors: changed while being verified"):
        volume.open_verified_checkpoint(checkpoints / "step-000000001")
