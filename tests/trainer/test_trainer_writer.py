"""The checkpoint writer's share of the cores: it hashes each tensor file while writing it, piece by piece as the
manifest wants, and runs at a low priority (nice 19) after the copy, a level the file threads it starts inherit."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.volume import file_digests


@pytest.mark.parametrize("chunk_bytes", [1000, 4096, 1 << 30])
def test_hashing_while_writing_gives_the_manifests_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
) -> None:
    monkeypatch.setattr(ckpt, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(ckpt, "_WRITE_SLICE", 1536)  # slices that straddle the piece boundaries
    tensors = {"a": torch.arange(3000, dtype=torch.float32), "b": torch.ones(1024, dtype=torch.int64)}
    path = tmp_path / "t.safetensors"
    pieces = ckpt.write_safetensors(path, tensors)
    assert pieces == file_digests(path, chunk_bytes)
    assert len(pieces) == max(1, -(-path.stat().st_size // chunk_bytes))


def test_the_writer_thread_and_the_threads_it_starts_run_at_nice_19() -> None:
    seen: dict[str, int] = {}

    def child() -> None:
        seen["child"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def writer() -> None:
        ckpt.lower_this_threads_priority()
        seen["writer"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        thread = threading.Thread(target=child)
        thread.start()
        thread.join()

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    assert seen == {"writer": ckpt.WRITER_NICE, "child": ckpt.WRITER_NICE}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before, "the training thread keeps its own"
