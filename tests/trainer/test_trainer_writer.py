"""The checkpoint writer's share of the cores: it hashes each tensor file while writing it, piece by piece as the
manifest wants, and runs at a low priority (nice 19) after the copy, a level the file threads it starts inherit."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

import pytest
import torch
from trainer_helpers import write_config

from trainer import checkpoint as ckpt
from trainer import checkpoint_files, volume
from trainer.faults import Faults
from trainer.train import run_leg
from trainer.volume import ExitCode, file_digests


def composed(tensors: dict[str, torch.Tensor], name: str = "t.safetensors") -> checkpoint_files.FileImage:
    """A file image of `tensors`, filled in as a capture fills it."""
    image = checkpoint_files.compose_file_image(tensors, None, name)
    for key, tensor in tensors.items():
        image.tensors[key].copy_(tensor)
    return image


@pytest.mark.parametrize("writer", ["document", "composed image"])
@pytest.mark.parametrize("chunk_bytes", [1000, 4096, 1 << 30])
def test_hashing_while_writing_gives_the_manifests_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int, writer: str
) -> None:
    monkeypatch.setattr(checkpoint_files, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(checkpoint_files, "_WRITE_SLICE", 1536)  # slices that straddle the piece boundaries
    tensors = {"a": torch.arange(3000, dtype=torch.float32), "b": torch.ones(1024, dtype=torch.int64)}
    path = tmp_path / "t.safetensors"
    if writer == "document":  # buffered, each slice hashed right before it is written
        pieces = checkpoint_files.write_bytes(path, bytes(composed(tensors).data))
    else:
        pieces = checkpoint_files.write_file_image(path, composed(tensors))
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
from trainer import checkpoint_files
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of killing us
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
tensors = {"w": torch.ones(3 * (1 << 18), dtype=torch.float32)}  # 3 MiB: slices of 1 MiB, the last one cut short
try:
    image = checkpoint_files.compose_file_image(tensors, None, "w")
    if sys.argv[3] == "image":  # O_DIRECT
        checkpoint_files.write_file_image(Path(sys.argv[1]), image)
    else:  # buffered
        checkpoint_files.write_bytes(Path(sys.argv[1]), bytes(image.data), fsync=True)
except OSError as exc:
    print("raised", exc.errno)
else:
    print("returned")
"""


@pytest.mark.parametrize("writer", ["document", "composed image"])
def test_a_write_the_disk_cannot_take_whole_fails_instead_of_leaving_a_short_file(tmp_path: Path, writer: str) -> None:
    """A volume that fills up in the middle of a file's last write: the kernel writes what fits and says so. A
    writer that took that count for success left a short file and a manifest of hashes it does not match; the
    write must raise (ENOSPC on a full volume; EFBIG here, where a file-size limit plays the full disk)."""
    import errno
    import subprocess
    import sys

    path = tmp_path / "model.safetensors"
    limit = (5 << 19) + 4096  # 2.5 MiB and a page: inside the third 1 MiB slice
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_PROBE, str(path), str(limit), "image" if writer == "composed image" else "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.split() == ["raised", str(errno.EFBIG)], done.stdout + done.stderr
    assert path.stat().st_size <= limit


def test_a_composed_file_is_the_library_s_file_with_every_tensor_aligned(tmp_path: Path) -> None:
    """HostBuffers composes each checkpoint file whole in one buffer (header, then the tensors in the file's order),
    which the writer writes as it is: the header, then each tensor's bytes in the file's order, a file the
    safetensors library loads, every tensor aligned for its type."""
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
    image = buffers.file_image(ckpt.MODEL_FILE, live, {"format": "pt"})
    for name, tensor in live.items():
        image.tensors[name].copy_(tensor)
    path = tmp_path / ckpt.MODEL_FILE
    pieces = checkpoint_files.write_file_image(path, image)
    assert pieces == file_digests(path, checkpoint_files.CHUNK_BYTES)
    one_by_one = b"".join(
        live[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        for name in checkpoint_files.file_layout(live)
    )
    assert path.read_bytes() == checkpoint_files.safetensors_prefix(live, {"format": "pt"}, path.name) + one_by_one
    loaded = load_file(str(path))
    assert loaded.keys() == live.keys()
    for name, tensor in live.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    for name, tensor in live.items():
        assert header[name]["data_offsets"][0] % tensor.element_size() == 0, f"{name} starts unaligned"
    # the same names, shapes and metadata reuse the buffer; a changed shape gets a new one
    assert buffers.file_image(ckpt.MODEL_FILE, live, {"format": "pt"}) is image
    grown = buffers.file_image(ckpt.MODEL_FILE, live | {"weight": torch.randn(65, 33)}, {"format": "pt"})
    assert grown.tensors["weight"].shape == (65, 33)


class WriteSpy:
    """The `os` of checkpoint_files, its writes recorded as (bytes, whether O_DIRECT was on); `refuse` plays the
    kernel's EINVAL for O_DIRECT: "open" at the open, "partial" at the second direct write, after a first one that
    took 1 MiB only (a short count, which the kernel may give)."""

    def __init__(self, refuse: str = "") -> None:
        self.writes: list[tuple[int, bool]] = []
        self.refuse = refuse

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def open(self, path: Path, flags: int, mode: int = 0o777) -> int:
        if self.refuse == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.open(path, flags, mode)

    def write(self, fd: int, data: memoryview) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        if direct and self.refuse == "partial":
            if any(d for _, d in self.writes):
                raise OSError(errno.EINVAL, "Invalid argument")
            data = data[: 1 << 20]
        count = os.write(fd, data)
        self.writes.append((count, direct))
        return count


needs_direct_io = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


def spy_on_direct_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WriteSpy:
    """A WriteSpy as checkpoint_files' `os`, where the file system of `tmp_path` takes O_DIRECT (else: skipped)."""
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError as exc:
        pytest.skip(f"SKIPPED LOUDLY: the file system of {tmp_path} refuses O_DIRECT ({exc})")
    spy = WriteSpy()
    monkeypatch.setattr(checkpoint_files, "os", spy)
    return spy


@needs_direct_io
def test_a_composed_file_goes_to_the_disk_direct_but_for_its_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_DIRECT: the disk reads the buffer itself, in one request, with no copy into the page cache and no
    writeback after; only the last bytes, less than a page, go through the page cache."""
    spy = spy_on_direct_writes(tmp_path, monkeypatch)
    tensors = {"w": torch.randn(3 * (1 << 18) + 5)}  # 3 MiB and a bit: three direct slices, then a tail
    path = tmp_path / "t.safetensors"
    pieces = checkpoint_files.write_file_image(path, composed(tensors))
    assert [direct for _, direct in spy.writes] == [True, False], spy.writes
    assert spy.writes[0][0] % checkpoint_files.PAGE == 0
    assert spy.writes[1][0] < checkpoint_files.PAGE
    assert pieces == file_digests(path, checkpoint_files.CHUNK_BYTES)
    assert checkpoint_files.tensors_from_safetensors(bytearray(path.read_bytes()), path)["w"].equal(tensors["w"])


@needs_direct_io
@pytest.mark.parametrize("refused", ["open", "partial"])
def test_a_file_system_that_refuses_direct_io_gets_the_file_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    """EINVAL for O_DIRECT, at the open (a file system without it) or at a write (one that wants larger blocks):
    the file is written buffered from there on, whole and hashed as before."""
    spy = WriteSpy(refuse=refused)
    monkeypatch.setattr(checkpoint_files, "os", spy)
    tensors = {"w": torch.randn(3 * (1 << 18) + 5)}
    path = tmp_path / "t.safetensors"
    pieces = checkpoint_files.write_file_image(path, composed(tensors))
    assert sum(direct for _, direct in spy.writes) == (0 if refused == "open" else 1), spy.writes
    assert sum(count for count, _ in spy.writes) == path.stat().st_size
    assert pieces == file_digests(path, checkpoint_files.CHUNK_BYTES)
    assert checkpoint_files.tensors_from_safetensors(bytearray(path.read_bytes()), path)["w"].equal(tensors["w"])


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


@needs_direct_io
@pytest.mark.parametrize("direct_writes", [True, False])
def test_checkpoint_direct_writes_false_keeps_a_leg_s_checkpoints_in_the_page_cache(
    snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_writes: bool
) -> None:
    """training.checkpointDirectWrites: false, for storage where O_DIRECT is slower (or misbehaves): no checkpoint
    file of the leg is written direct; the default writes its tensor files direct. Either way they verify."""
    spy = spy_on_direct_writes(tmp_path, monkeypatch)
    config = write_config(
        tmp_path / "config.json", maxSteps=8, checkpointEverySteps=4, checkpointDirectWrites=direct_writes
    )
    result = run_leg(tmp_path / "run", snapshot, config, faults=Faults(), install_signals=False)
    assert result.exit_code == ExitCode.COMPLETE, result.message
    direct = sum(d for _, d in spy.writes)
    assert (direct > 0) == direct_writes, spy.writes
    saved = volume.list_checkpoint_dirs(tmp_path / "run" / "checkpoints")
    assert [step for step, _ in saved] == [4, 8]
    for _, folder in saved:
        volume.read_checkpoint(folder, verify_hashes=True)
