"""Checkpoints: take the training state into host memory, write it off the training thread, load it back.

A checkpoint folder `checkpoints/step-<9 digits>/` holds::

    model.safetensors       the model's state_dict (full precision)
    optimizer.<key>.safetensors  one file per optimizer state key (AdamW: exp_avg, exp_avg_sq, step), one
                            tensor per parameter index; files of similar size hash in parallel
    optimizer.json          param groups and non-tensor optimizer state
    rng.json                python `random`, numpy, torch CPU and every CUDA device's RNG state
    trainer_state.json      data position (epoch, batch_in_epoch, step), LR scheduler state, loss sums,
                            thread count, device, snapshot hash; what the data order is derived from
    config.json             the TrainerConfig the run was made with
    model_config.json       the model's config (lets `predict` load a checkpoint)
    manifest.json           written last (volume.compose_manifest): size + XXH3-128 hash of each 64 MiB piece
                            of each file above (manifest format 3; formats 1 and 2, sha256, load too)

It is written into `checkpoints/.tmp-g<leg>-step-<N>.<pid>.<thread>/` (`.tmp-step-...` for a leg without a
generation), every file and the folder fsynced, then the folder renamed to `step-<N>` and the parent fsynced: a
SIGKILL or a crash at any instant leaves either no `step-<N>` or a complete one (stale `.tmp-*` folders of
older generations are removed at the next start). The tensor files are composed in host memory and written with
O_DIRECT (checkpoint_files). Right before the rename, and before each deletion of
retention, the fence is read again: a leg superseded by a newer one commits nothing (volume.fencing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import faults
from trainer.checkpoint_consistency import CONFIG_FILE, STATE_FILE
from trainer.checkpoint_files import (
    FileImage,
    compose_file_image,
    tensors_from_safetensors,
    write_bytes,
    write_file_image,
)
from trainer.volume import (
    MANIFEST_NAME,
    CheckpointInfo,
    CheckpointInvalid,
    Fenced,
    VerifiedCheckpoint,
    checkpoint_dir_name,
    compose_manifest,
    fencing,
    fsync_dir,
    fsync_files,
    json_document,
    list_checkpoint_dirs,
    read_checkpoint,
    select_for_deletion,
)

log = logging.getLogger("trainer")

MODEL_FILE = "model.safetensors"
OPTIMIZER_META_FILE = "optimizer.json"
_OPTIMIZER_KEY = re.compile(r"[A-Za-z0-9_]+")  # an optimizer state key that can name its file
_OPTIMIZER_FILE = re.compile(r"^optimizer\.([A-Za-z0-9_]+)\.safetensors$")
RNG_FILE = "rng.json"  # rank 0's (the only one of a single-process leg); ranks > 0: rank_rng_file
MODEL_CONFIG_FILE = "model_config.json"
# What load_checkpoint reads besides the optimizer tensors: a checkpoint whose manifest lacks one is invalid.
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_META_FILE, RNG_FILE, STATE_FILE)


def optimizer_file(key: str) -> str:
    """The file of one optimizer state key (exp_avg, ...): a tensor per parameter index (_OPTIMIZER_FILE)."""
    return f"optimizer.{key}.safetensors"


def rank_rng_file(rank: int) -> str:
    """The RNG states of rank `rank` > 0 of a data-parallel leg (listed in the manifest like every file)."""
    return f"rng.rank-{rank}.json"


RETENTION_METRIC = "loss"  # the interval's mean training loss; lower is better


@dataclass
class HostState:
    """Everything one checkpoint holds, already copied off the live model into host memory."""

    step: int
    epoch: int
    # MODEL_FILE (the model's state_dict), then optimizer_file(key) for each optimizer state key (its tensors named
    # by parameter index), each composed in host memory
    tensor_files: dict[str, FileImage]
    optimizer_meta: dict[str, Any]
    rng: dict[str, Any]
    trainer_state: dict[str, Any]
    config_json: str
    model_config_json: str
    config_hash: str
    metrics: dict[str, float]
    extra: dict[str, Any]
    emergency: bool = False
    rank_rngs: list[dict[str, Any]] = field(default_factory=list)  # ranks 1.. of a data-parallel leg
    # (host target, live source) pairs still to copy; see finish_copies
    deferred: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class ModelFacts:
    """What a checkpoint takes from the model that its training never changes (HostBuffers.model_facts)."""

    parameter_names: frozenset[str]
    config_json: str  # model_config.json


class HostBuffers:
    """Host memory reused from one checkpoint to the next: copying into memory that is already mapped costs a
    plain memcpy, where fresh allocations would also pay a page fault per page (the larger part of the stall).

    Each checkpoint file is composed whole in one page-aligned buffer (checkpoint_files.FileImage: header, then the
    data section, into which a capture copies the tensors), so the writer hashes and writes the file in large
    slices instead of tensor by tensor (a small model has ~160 tensors of a few KB: that per-tensor work was a
    third of the writer's CPU), and with O_DIRECT, straight from that buffer.

    Safe because a capture only happens once the previous write has finished (AsyncCheckpointWriter).
    """

    def __init__(self) -> None:
        self._files: dict[str, tuple[tuple[Any, ...], FileImage]] = {}
        self._models: weakref.WeakKeyDictionary[torch.nn.Module, ModelFacts] = weakref.WeakKeyDictionary()

    def model_facts(self, model: torch.nn.Module) -> ModelFacts:
        """What a checkpoint needs of `model` that its training never changes, taken once per model: serializing
        a transformers config alone cost the training thread 2 ms per checkpoint."""
        facts = self._models.get(model)
        if facts is None:
            config = getattr(model, "config", None)
            facts = ModelFacts(
                parameter_names=frozenset(name for name, _ in model.named_parameters()),
                config_json=config.to_json_string() if config is not None else "{}",
            )
            self._models[model] = facts
        return facts

    def file_image(
        self, file: str, sources: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> FileImage:
        """The image of checkpoint file `file` that holds `sources`' copies: composed on first use, and again when
        the names, shapes, dtypes or metadata change."""
        signature = (
            tuple((name, tuple(t.shape), t.dtype, t.is_cuda) for name, t in sorted(sources.items())),
            tuple(sorted((metadata or {}).items())),
        )
        cached = self._files.get(file)
        if cached is not None and cached[0] == signature:
            return cached[1]
        image = compose_file_image(sources, metadata, file, pinned=any(t.is_cuda for t in sources.values()))
        self._files[file] = (signature, image)
        return image


# at::internal::GRAIN_SIZE: torch runs an elementwise CPU op on the calling thread alone below this many elements.
_TORCH_GRAIN_SIZE = 32768


def copy_off_the_training_thread(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy `source` into `target` on this thread alone, never with torch's intra-op (OpenMP) parallelism.

    A parallel torch CPU op on a thread other than the training's gives that thread an OpenMP team of its own.
    libgomp then manages more threads than there are cores and throttles the spin-wait of every team for the rest
    of the process: each later training step paid futex wake-ups at every parallel region. At 2 torch threads on
    2 cores that doubled the tiny model's steps (15 -> 31 ms) from the first checkpoint on. A plain memory copy
    through numpy starts no thread; device copies and odd layouts keep torch's copy (no CPU team either way for
    the former; the latter are small). So do tensors too small for torch to split (at most its grain), for
    which its copy runs inline and costs less than numpy's conversions (a small model has ~160 of them).
    """
    if source.device.type == target.device.type == "cpu" and source.numel() <= _TORCH_GRAIN_SIZE:
        target.copy_(source)
        return
    if (
        target.device.type == source.device.type == "cpu"
        and target.dtype == source.dtype
        and target.shape == source.shape
        and target.is_contiguous()
        and source.is_contiguous()
    ):
        destination = target.detach().reshape(-1).view(torch.uint8).numpy()
        np.copyto(destination, source.detach().reshape(-1).view(torch.uint8).numpy())
        return
    target.copy_(source, non_blocking=source.is_cuda)


def finish_copies(state: HostState) -> None:
    """Copy the deferred tensors (parameters and optimizer state) into host memory. Runs on the writer thread
    while the next step's forward and backward passes only read them; the training thread waits for it
    before the next optimizer.step(), the first thing that changes them."""
    if not state.deferred:
        return
    faults.active().before_checkpoint_copy()  # tests only: a slow copy must still hold its own step's state
    for target, source in state.deferred:
        copy_off_the_training_thread(target, source)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking device-to-host copies are complete
    state.deferred = []


def capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, [int(k) for k in np_keys], int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch_cpu": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore every RNG; call last, after which nothing may draw from them before the next step."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def capture(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    config_json: str,
    config_hash: str,
    metrics: dict[str, float],
    extra: dict[str, Any],
    emergency: bool = False,
    buffers: HostBuffers | None = None,
    rng: dict[str, Any] | None = None,
) -> HostState:
    """Take the state of this step boundary: RNGs (`rng` when the caller took them: capture_rng), scheduler,
    counters and module buffers now; parameters and optimizer tensors are only referenced here (`deferred`) and
    copied by `finish_copies` on the writer thread, since nothing changes them before the next optimizer.step()."""
    buffers = buffers or HostBuffers()
    facts = buffers.model_facts(model)
    deferred: list[tuple[torch.Tensor, torch.Tensor]] = []
    live_model = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    model_image = buffers.file_image(MODEL_FILE, live_model, {"format": "pt"})
    model_tensors = model_image.tensors
    for name, tensor in live_model.items():
        if name in facts.parameter_names:
            deferred.append((model_tensors[name], tensor))
        else:  # module buffers (e.g. running statistics) can change in a forward pass: copy them now
            model_tensors[name].copy_(tensor, non_blocking=tensor.is_cuda)
    opt_state = optimizer.state_dict()
    live_optimizer: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entries in opt_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                live_optimizer.setdefault(key, {})[str(param_id)] = value.detach()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    tensor_files = {MODEL_FILE: model_image}
    for key, live in sorted(live_optimizer.items()):
        if not _OPTIMIZER_KEY.fullmatch(key):
            raise ValueError(f"optimizer state key {key!r} cannot name a checkpoint file")
        image = tensor_files[optimizer_file(key)] = buffers.file_image(optimizer_file(key), live)
        deferred.extend((image.tensors[index], tensor) for index, tensor in live.items())
    meta = {"param_groups": opt_state["param_groups"], "scalars": scalars}
    full_state = {**trainer_state, "scheduler": scheduler.state_dict()}
    return HostState(
        step=int(trainer_state["step"]),
        epoch=int(trainer_state["epoch"]),
        tensor_files=tensor_files,
        optimizer_meta=meta,
        rng=rng if rng is not None else capture_rng(),
        trainer_state=json.loads(json.dumps(full_state)),
        config_json=config_json,
        model_config_json=facts.config_json,
        config_hash=config_hash,
        metrics=dict(metrics),
        extra=dict(extra),
        emergency=emergency,
        deferred=deferred,
    )


def write_checkpoint(state: HostState, checkpoints_dir: Path, *, direct_writes: bool = True) -> CheckpointInfo:
    """Serialize `state` into a temp folder, fsync, write the manifest last, rename into place. `direct_writes`: the
    tensor files with O_DIRECT where the file system takes it (TrainingSettings.checkpoint_direct_writes).

    Raises Fenced (and leaves no `step-<N>`) when a newer leg superseded this one: checked right before the
    rename, and after any error of the write (a newer leg's start removes this leg's temp folder).
    """
    fence = fencing.active()
    try:
        return _write_checkpoint(state, checkpoints_dir, fence, direct_writes)
    except Fenced:
        raise
    except Exception:
        fence.check(f"checkpoint step {state.step}")  # superseded: Fenced, not the error its removal caused
        raise


# Tensor files of a checkpoint at least this big in all are written on a thread each (see _write_checkpoint).
_PARALLEL_FILES_MIN_BYTES = 32 << 20


def _write_checkpoint(
    state: HostState, checkpoints_dir: Path, fence: fencing.Fence, direct_writes: bool
) -> CheckpointInfo:
    finish_copies(state)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / checkpoint_dir_name(state.step)
    tmp = checkpoints_dir / f"{fence.temp_prefix()}{final.name}.{os.getpid()}.{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    hashes: dict[str, tuple[str, ...]] = {}
    unsynced: list[str] = []  # written, fsynced below together
    if sum(len(image.data) for image in state.tensor_files.values()) >= _PARALLEL_FILES_MIN_BYTES:
        # Every tensor file is written and fsynced on a thread of its own: the disk flushes them together, where
        # one after the other it waited for each file's fsync in turn (MiniLM: 0.29 s vs dd's 0.2 s, same bytes).
        with ThreadPoolExecutor(max_workers=len(state.tensor_files), thread_name_prefix="checkpoint-file") as files:
            written = {
                name: files.submit(write_file_image, tmp / name, image, direct=direct_writes)
                for name, image in state.tensor_files.items()
            }
            hashes[MODEL_FILE] = written[MODEL_FILE].result()
            faults.active().in_checkpoint_write(state.step)  # tests only: a slow write, or a SIGKILL inside it
            hashes.update({name: future.result() for name, future in written.items()})
    else:
        # A small model: starting threads and handing the GIL between them costs the training more than writing
        # the files one after the other here, and one journal commit below makes them all durable.
        for name, image in state.tensor_files.items():
            hashes[name] = write_file_image(tmp / name, image, fsync=False, direct=direct_writes)
            unsynced.append(name)
            if name == MODEL_FILE:
                faults.active().in_checkpoint_write(state.step)
    for name, document in (
        (OPTIMIZER_META_FILE, json.dumps(state.optimizer_meta)),
        (RNG_FILE, json.dumps(state.rng)),
        (STATE_FILE, json.dumps(state.trainer_state, indent=2, sort_keys=True)),
        (CONFIG_FILE, state.config_json),
        (MODEL_CONFIG_FILE, state.model_config_json),
        *((rank_rng_file(rank), json.dumps(rng)) for rank, rng in enumerate(state.rank_rngs, start=1)),
    ):
        hashes[name] = write_bytes(tmp / name, document.encode("utf-8"))
        unsynced.append(name)
    # The manifest is written like the rest (no rename of its own): the folder is published by its rename below,
    # once everything in it is durable, so no reader ever sees it without its manifest.
    manifest, info = compose_manifest(
        tmp,
        step=state.step,
        epoch=state.epoch,
        config_hash=state.config_hash,
        metrics=state.metrics,
        extra=state.extra,
        hashes=hashes,
        fsynced=hashes.keys(),
    )
    write_bytes(tmp / MANIFEST_NAME, json_document(manifest).encode("utf-8"))
    # fsynced once all are written, their blocks allocated (checkpoint_files.start_writeback): the first fsync's
    # journal commit takes every file's metadata along, and the rest find nothing left to do; one by one, each
    # paid a commit of its own. Then the folder, whose entries that commit holds too.
    fsync_files(tmp, [*unsynced, MANIFEST_NAME])
    fsync_dir(tmp)
    if final.exists():
        # Same step already saved (e.g. resumed from it): the content is identical by construction.
        shutil.rmtree(tmp, ignore_errors=True)
        return read_checkpoint(final, verify_hashes=False)
    try:
        fence.check(f"checkpoint step {state.step}")  # the commit point: nothing is renamed for a superseded leg
    except Fenced:
        shutil.rmtree(tmp, ignore_errors=True)  # its own temp folder, of its own generation
        raise
    os.replace(tmp, final)
    fsync_dir(checkpoints_dir)
    return CheckpointInfo(
        final, info.step, info.epoch, info.created_at, info.config_hash, info.metrics, info.files, info.extra
    )


def apply_retention(
    checkpoints_dir: Path, keep_last: int, best_metric: str = RETENTION_METRIC, higher_is_better: bool = False
) -> list[int]:
    """Delete checkpoints retention no longer keeps (the last `keep_last`, the best by `best_metric` in their
    manifests, never the newest); returns the deleted steps."""
    infos = []
    for _, folder in list_checkpoint_dirs(checkpoints_dir):
        try:
            infos.append(read_checkpoint(folder, verify_hashes=False))
        except CheckpointInvalid:
            continue  # left for the next start's verification to quarantine
    deleted = []
    fence = fencing.active()
    protected = fence.protected_steps()  # the step a newer leg resumed from; Fenced when there is a newer leg
    doomed_list = select_for_deletion(
        infos, keep_last=keep_last, best_metric=best_metric, higher_is_better=higher_is_better, protected=protected
    )
    for info in doomed_list:
        fence.check(f"retention of step {info.step}")  # re-read before each deletion: it may move in between
        doomed = checkpoints_dir / f"{fence.temp_prefix()}delete-{info.path.name}.{os.getpid()}"
        os.replace(info.path, doomed)  # first out of sight, then removed; a kill in between leaves a .tmp-
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(info.step)
    # Not fsynced: a deletion lost in a crash only brings back a checkpoint retention deletes again (or a .tmp-
    # folder the next start removes); the next checkpoint's commit makes it durable anyway.
    return deleted


@dataclass
class LoadedCheckpoint:
    info: CheckpointInfo
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    trainer_state: dict[str, Any]


def load_checkpoint(verified: VerifiedCheckpoint) -> LoadedCheckpoint:
    """A verified checkpoint's state, taken from the bytes that were verified (tensors on CPU, no file read)."""
    info, contents = verified.info, verified.contents

    def document(name: str) -> Any:
        return json.loads(bytes(contents[name]))

    model_state = tensors_from_safetensors(contents[MODEL_FILE], info.path / MODEL_FILE)
    meta = document(OPTIMIZER_META_FILE)
    state: dict[int, dict[str, Any]] = {}
    for entry in info.files:
        match = _OPTIMIZER_FILE.match(entry.path)
        if match:
            for param_id, tensor in tensors_from_safetensors(contents[entry.path], info.path / entry.path).items():
                state.setdefault(int(param_id), {})[match.group(1)] = tensor
    for param_id, entries in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(entries)
    groups = meta["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return LoadedCheckpoint(
        info, model_state, {"state": state, "param_groups": groups}, document(RNG_FILE), document(STATE_FILE)
    )


@dataclass
class WriterStats:
    saves: int = 0
    write_seconds: list[float] = field(default_factory=list)


# The writer's nice level: on the busy cores of a training (every core runs a torch thread by default) the write's
# hashing and file copies then take the cores' idle moments instead of time slices from the steps; the file threads
# it starts inherit the level. Once lowered it stays (raising it back needs CAP_SYS_NICE); the writer's next copy
# of the tensors then also runs at it, while the training thread only reads them.
WRITER_NICE = 19


def lower_this_threads_priority() -> None:
    """Give the calling thread (Linux: its own nice value) WRITER_NICE; harmless where that is refused."""
    with contextlib.suppress(OSError, AttributeError):
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        if current < WRITER_NICE:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


class AsyncCheckpointWriter:
    """One background thread that writes checkpoints; at most one write in flight.

    `submit` returns at once; `wait` blocks until the in-flight write is done and re-raises its error.
    """

    def __init__(
        self,
        checkpoints_dir: Path,
        keep_last: int,
        best_metric: str = RETENTION_METRIC,
        higher_is_better: bool = False,
        *,
        direct_writes: bool = True,
    ) -> None:
        self.checkpoints_dir = checkpoints_dir
        self.keep_last = keep_last
        self.direct_writes = direct_writes  # write_checkpoint's
        self.best_metric, self.higher_is_better = best_metric, higher_is_better  # retention's "the best"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future[CheckpointInfo] | None = None
        self.last_saved: CheckpointInfo | None = None
        self.stats = WriterStats()
        self.buffers = HostBuffers()  # reused by every capture; free again once `wait` returned
        self._copied = threading.Event()
        self._copied.set()

    def _write(self, state: HostState) -> CheckpointInfo:
        started = time.perf_counter()
        try:
            finish_copies(state)
        finally:
            self._copied.set()
        lower_this_threads_priority()  # nothing waits on the rest but the next checkpoint
        info = write_checkpoint(state, self.checkpoints_dir, direct_writes=self.direct_writes)
        self.stats.write_seconds.append(time.perf_counter() - started)
        self.stats.saves += 1
        deleted = apply_retention(self.checkpoints_dir, self.keep_last, self.best_metric, self.higher_is_better)
        if deleted:
            log.info(
                "retention: removed checkpoint step %s (keeping the last %d, the best and the newest)",
                ", ".join(map(str, deleted)),
                self.keep_last,
            )
        return info

    def submit(self, state: HostState) -> None:
        self.wait()
        self._copied.clear()
        self._pending = self._pool.submit(self._write, state)

    def wait_copied(self) -> float:
        """Block until the last submitted checkpoint's tensors are copied (call before optimizer.step());
        returns the seconds waited."""
        if self._copied.is_set():
            return 0.0
        started = time.perf_counter()
        self._copied.wait()
        return time.perf_counter() - started

    def save_now(self, state: HostState) -> CheckpointInfo:
        self.submit(state)
        result = self.wait()
        assert result is not None
        return result

    def poll(self) -> CheckpointInfo | None:
        """The checkpoint just finished, if the in-flight write completed since the last call; else None."""
        if self._pending is not None and self._pending.done():
            return self.wait()
        return None

    def wait(self) -> CheckpointInfo | None:
        """Block until the in-flight write is done; its checkpoint, or None when nothing was in flight."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        self.last_saved = pending.result()
        return self.last_saved

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
