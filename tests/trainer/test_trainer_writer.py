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


OPENMP_PROBE = r"""
import json, os, sys, threading
import torch
from trainer import checkpoint as ckpt

def foreign_threads():  # native threads Python did not start: torch's OpenMP workers
    python = {t.native_id for t in threading.enumerate()}
    return {int(task) for task in os.listdir("/proc/self/task")} - python

torch.set_num_threads(2)
model = torch.nn.Linear(512, 512)  # 262k weights: above torch's grain for a parallel copy
optimizer = torch.optim.AdamW(model.parameters())
model(torch.randn(4, 512)).sum().backward()
optimizer.step()
before = foreign_threads()  # the training thread's own team exists by now
writer = ckpt.AsyncCheckpointWriter(__import__("pathlib").Path(sys.argv[1]), keep_last=2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
state = ckpt.capture(model=model, optimizer=optimizer, scheduler=scheduler, trainer_state={"step": 1, "epoch": 0},
    config_json="{}", config_hash="h", metrics={}, extra={}, buffers=writer.buffers)
writer.submit(state)
writer.wait()
after_writer = foreign_threads()
from safetensors.torch import load_file
saved = load_file(writer.last_saved.path / ckpt.MODEL_FILE)
equal = all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())
control = threading.Thread(target=lambda: torch.empty(262144).copy_(torch.ones(262144)))
control.start(); control.join()
after_control = foreign_threads()
print(json.dumps({"writer": len(after_writer - before), "control": len(after_control - after_writer), "equal": equal}))
writer.close()
os._exit(0)
"""


def test_the_writer_thread_starts_no_openmp_team(tmp_path: Path) -> None:
    """A parallel torch op on a thread other than the training's gives that thread an OpenMP team of its own; libgomp
    then throttles every team's spin-wait for good, and each later training step got slower (tiny: 15 -> 31 ms at
    2 threads on 2 cores, from the first checkpoint on). The writer's copy of the tensors must start no thread."""
    import json
    import subprocess
    import sys

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: torch starts no OpenMP team on any thread here, so the probe cannot see one")
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root / "trainer_image"), str(root)])}
    done = subprocess.run(
        [sys.executable, "-c", OPENMP_PROBE, str(tmp_path / "checkpoints")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["control"] > 0, f"the probe sees no team even for torch's own copy on a thread: {found}"
    assert found["writer"] == 0, f"the checkpoint writer started {found['writer']} OpenMP thread(s)"
    assert found["equal"], "the checkpoint does not hold the model's weights"


_FULL_DISK_PROBE = """
import resource, signal, sys, torch
from pathlib import Path
from trainer import checkpoint as ckpt
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of killing us
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
tensors = {"w": torch.ones(3 * (1 << 18), dtype=torch.float32)}  # 3 MiB: slices of 1 MiB, the last one cut short
try:
    ckpt.write_safetensors(Path(sys.argv[1]), tensors)
except OSError as exc:
    print("raised", exc.errno)
else:
    print("returned")
"""


def test_a_write_the_disk_cannot_take_whole_fails_instead_of_leaving_a_short_file(tmp_path: Path) -> None:
    """A volume that fills up in the middle of a file's last write: the kernel writes what fits and says so. A
    writer that took that count for success left a short file and a manifest of hashes it does not match; the
    write must raise (ENOSPC on a full volume; EFBIG here, where a file-size limit plays the full disk)."""
    import errno
    import subprocess
    import sys

    path = tmp_path / "model.safetensors"
    limit = (5 << 19) + 4096  # 2.5 MiB and a page: inside the third 1 MiB slice
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_PROBE, str(path), str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.split() == ["raised", str(errno.EFBIG)], done.stdout + done.stderr
    assert path.stat().st_size <= limit


def test_a_file_laid_out_in_one_buffer_is_written_whole_and_loads_as_the_library_reads_it(tmp_path: Path) -> None:
    """HostBuffers lays a checkpoint file's tensors out in one buffer, in the file's order, so the writer writes
    its data section as one piece; the file must still load, every tensor aligned for its type."""
    import json

    from safetensors.torch import load_file

    live = {
        "bias": torch.arange(5, dtype=torch.float32),
        "counts": torch.arange(3, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "half": torch.randn(3, 5).to(torch.bfloat16),
        "weight": torch.randn(64, 33),
        "empty": torch.zeros(0, 4),
    }
    buffers = ckpt.HostBuffers()
    targets = buffers.file_targets(ckpt.MODEL_FILE, live)
    for name, tensor in live.items():
        targets[name].copy_(tensor)
    assert ckpt.data_section([targets[name] for name in ckpt.file_layout(targets)])[0].nbytes == sum(
        t.nbytes for t in live.values()
    ), "the tensors were not written as one piece"
    path = tmp_path / ckpt.MODEL_FILE
    pieces = ckpt.write_safetensors(path, targets)
    assert pieces == file_digests(path, ckpt.CHUNK_BYTES)
    loaded = load_file(str(path))
    assert loaded.keys() == live.keys()
    for name, tensor in live.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    for name, tensor in live.items():
        assert header[name]["data_offsets"][0] % tensor.element_size() == 0, f"{name} starts unaligned"
    # the same names and shapes reuse the buffer; a changed shape gets a new one
    assert buffers.file_targets(ckpt.MODEL_FILE, live)["weight"].data_ptr() == targets["weight"].data_ptr()
    grown = buffers.file_targets(ckpt.MODEL_FILE, live | {"weight": torch.randn(65, 33)})
    assert grown["weight"].shape == (65, 33)


def test_fsyncing_a_folders_files_never_goes_through_a_planted_symlink(tmp_path: Path) -> None:
    from trainer.volume import fsync_files
    from trainer.volume.durable import SymlinkRefused

    folder = tmp_path / "step"
    folder.mkdir()
    (folder / "a.json").write_text("{}")
    (tmp_path / "elsewhere").write_text("x")
    (folder / "b.json").symlink_to(tmp_path / "elsewhere")
    fsync_files(folder, ["a.json"])
    with pytest.raises(SymlinkRefused, match=r"b\.json"):
        fsync_files(folder, ["a.json", "b.json"])
    with pytest.raises(FileNotFoundError, match=r"c\.json"):
        fsync_files(folder, ["c.json"])
