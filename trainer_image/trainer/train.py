"""One training leg: check the inputs, build the model, resume from the newest verified checkpoint, hand over.

`run_leg` is what `python -m trainer train` runs. Same arguments always mean "carry on": a finished run
exits 0 at once, a run with checkpoints resumes from the newest verified one, else it starts fresh.
With `--generation N` (the leg number the controller launched it as) the leg is fenced: once the run's
fence.json names a newer leg it commits nothing more and exits ExitCode.FENCED (volume.fencing).
Resume restores, in this order: model built (seeded) -> train mode -> optimizer and scheduler built ->
weights, optimizer state, scheduler state loaded -> every RNG restored last (see DETERMINISM.md).

The leg's other parts live in their own modules: loop.py (steps, accumulation, evaluation, final model),
checkpoint_policy.py (when to checkpoint, what it holds, the stall), preemption.py (SIGTERM -> exit 75),
faults.py (the test-only fault hooks), leg_state.py (the plan, learner and totals they share).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from trainer import data as data_mod
from trainer.checkpoint_consistency import check_self_consistent
from trainer.config import TrainerConfig
from trainer.distributed import MICRO_BATCH_DROPOUT, World, accumulation_for, reporter_for
from trainer.errors import InvalidInput, Preempted
from trainer.faults import Faults, injected
from trainer.leg_state import Learner, LegStats, Plan, Totals
from trainer.preemption import StopRequest, finish_preempted
from trainer.reporting import Reporter
from trainer.volume import (
    TMP_PREFIX,
    CheckpointInfo,
    CheckpointInvalid,
    ExitCode,
    Fenced,
    FenceUnreadable,
    RunLayout,
    SymlinkRefused,
    VerifiedCheckpoint,
    checkpoint_dir_name,
    fencing,
    find_latest_verified,
    list_checkpoint_dirs,
    quarantine,
    read_checkpoint,
    read_json,
    remove_stale_temp_dirs,
    write_termination_message,
)
from trainer.volume.durable import opened_dir

if TYPE_CHECKING:
    from trainer.evaluation import EvalTracker
    from trainer.optimizer import Implementation

log = logging.getLogger("trainer")


@dataclass
class LegResult:
    exit_code: ExitCode
    message: str
    stats: LegStats


def load_config(path: Path) -> TrainerConfig:
    """The run's TrainerConfig; InvalidInput naming the file and the first bad field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"config {path}: unreadable ({exc.strerror or exc})") from exc
    try:
        return TrainerConfig.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        parts = [str(part) if str(part).isprintable() else json.dumps(str(part)) for part in first["loc"]]
        where = ".".join(parts) or "(document)"  # a key with a newline is quoted: the message stays one line
        raise InvalidInput(f"config {path}: {where}: {first['msg']}") from exc


def _checkpoint_config_diff(folder: Path, config: TrainerConfig) -> str:
    try:
        recorded = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "its recorded config is unreadable"
    current = json.loads(config.to_json_text())
    fields = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    return "fields: " + ", ".join(f"{k} {recorded.get(k)!r} -> {current.get(k)!r}" for k in fields)


def check_run_matches(layout: RunLayout, config: TrainerConfig, config_path: Path, snapshot_sha256: str) -> None:
    """Refuse a run dir whose checkpoints were made with another config, thread count or snapshot."""
    identity = config.identity_hash()
    for info in _self_consistent_checkpoints(layout):
        folder = info.path
        threads = info.extra.get("torch_threads")
        if threads is not None and threads != config.torch_threads:
            raise InvalidInput(
                f"torchThreads: {config.torch_threads} differs from {threads} that {folder} was made with "
                f"(CPU results depend on it; keep {threads} for this run)"
            )
        if info.config_hash != identity:
            raise InvalidInput(
                f"config {config_path}: differs from the one {folder} was made with "
                f"({_checkpoint_config_diff(folder, config)})"
            )
        recorded_snapshot = info.extra.get("snapshot_sha256")
        if recorded_snapshot and recorded_snapshot != snapshot_sha256:
            raise InvalidInput(
                f"snapshot: content {snapshot_sha256[:12]} differs from {recorded_snapshot[:12]} "
                f"that {folder} was made with"
            )


def finished_run(layout: RunLayout, config: TrainerConfig, config_path: Path) -> CheckpointInfo | None:
    """The run's final model when it is complete and made with this config; InvalidInput for another config."""
    if not (layout.final_dir / "manifest.json").is_file():
        return None
    try:
        info = read_checkpoint(layout.final_dir, verify_hashes=False)
    except CheckpointInvalid:
        return None
    if info.config_hash != config.identity_hash():
        if _newest_consistent_config_hash(layout) == config.identity_hash():
            # final/ has no config of its own to check its config_hash against; the checkpoints it was made
            # from do, and say this config: final/ is the odd one (tampered), so it is redone from them.
            reason = f"{layout.final_dir / 'manifest.json'}: config_hash disagrees with the run's own checkpoints"
            moved = quarantine(layout.final_dir, layout.quarantine_dir, reason)
            log.warning("final model quarantined to %s: %s", moved, reason)
            return None
        raise InvalidInput(f"config {config_path}: differs from the one {layout.final_dir} was made with")
    return info


def _self_consistent_checkpoints(layout: RunLayout) -> Iterator[CheckpointInfo]:
    """The checkpoints that agree with themselves, newest first (hashes not verified: a cheap look).

    Only those speak for the run's inputs; one that does not agree with itself is no input of the run (tampered
    or mixed up) and is quarantined by the verified search.
    """
    for _, folder in reversed(list_checkpoint_dirs(layout.checkpoints_dir)):
        try:
            info = read_checkpoint(folder, verify_hashes=False)
            check_self_consistent(info, lambda name: read_json(folder / name))  # noqa: B023 (called right here)
        except CheckpointInvalid:
            continue
        yield info


def _newest_consistent_config_hash(layout: RunLayout) -> str | None:
    return next((info.config_hash for info in _self_consistent_checkpoints(layout)), None)


def _remove_stale_run_temps(layout: RunLayout) -> None:
    if layout.run_dir.is_dir():
        for path in layout.run_dir.iterdir():
            if path.is_dir() and path.name.startswith((f"{TMP_PREFIX}final", f"{TMP_PREFIX}tokenizer")):
                fencing.check(f"remove {path.name}")
                shutil.rmtree(path, ignore_errors=True)


def run_leg(
    run_dir: Path,
    snapshot: Path,
    config_path: Path,
    *,
    stop: StopRequest | None = None,
    install_signals: bool = True,
    faults: Faults | None = None,
    generation: int | None = None,
    world: World | None = None,
    allow_uneven: bool = False,
) -> LegResult:
    """Run one leg to its end; never raises for the documented outcomes (see ExitCode).

    On failure (exit 1), invalid input (exit 65) and fencing (exit 76) the one-line reason also goes to the
    termination-message file named by $RELAY_TERMINATION_LOG, when set (see volume.write_termination_message).
    `faults` (tests only) defaults to what the RELAY_TEST_* variables ask for: none in production (faults.py).
    `generation` (the leg number) fences the leg: see volume.fencing; None runs it unfenced.
    `world`: this rank of a data-parallel leg (trainer.distributed; default one process); `allow_uneven` lets a
    resumed run's global batch be split unevenly over a world size that does not divide it.
    """
    stop = stop or StopRequest()
    previous_handlers = stop.install() if install_signals else {}
    ranks = _Ranks(world or World(), allow_uneven)
    try:
        result = _fenced_leg(run_dir, snapshot, config_path, stop, faults, generation, ranks)
    finally:
        StopRequest.restore(previous_handlers)
    if result.exit_code in (ExitCode.FAILED, ExitCode.INVALID_INPUT, ExitCode.FENCED):
        write_termination_message(result.message)
    return result


def not_writable_detail(folder: Path) -> str:
    """Who cannot write `folder`, and whose it is: a claim made by root (hostPath, NFS: no fsGroup) is not
    writable by the image's UID 1000, and the fix is the volume's owner or the pod's fsGroup, not a retry."""
    owner = ""
    with contextlib.suppress(OSError):
        info = folder.stat()
        owner = f"; it is owned by UID {info.st_uid} GID {info.st_gid}, mode {info.st_mode & 0o7777:o}"
    return (
        f"not writable by UID {os.geteuid()} (GID {os.getegid()}){owner}: make the volume writable by that UID, "
        "or give the pod an fsGroup the volume honours"
    )


def run_dir_problem(layout: RunLayout) -> str | None:
    """Why the leg cannot use its run folder (one line naming the path), or None; makes the folder if absent.

    Checked before anything is written there, so the answer goes to the termination log, not a traceback.
    """
    where = f"--run-dir {layout.run_dir}"
    try:
        with opened_dir(layout.run_dir, create=True):  # every folder on the way, none through a symlink
            pass
    except SymlinkRefused as exc:
        return f"{where}: {exc.filename} is a symlink (never followed)"
    except (NotADirectoryError, FileExistsError) as exc:
        return f"{where}: {exc.filename} is not a folder"
    except OSError as exc:
        return f"{where}: cannot be made or opened ({exc.strerror or exc})"
    if not os.access(layout.run_dir, os.W_OK | os.X_OK):
        return f"{where}: {not_writable_detail(layout.run_dir)}"
    for folder in (layout.checkpoints_dir, layout.quarantine_dir, layout.final_dir, layout.legs_dir):
        if folder.is_symlink():  # the trainer would write through it (durable writes refuse it too)
            return f"{where}: {folder} is a symlink (never followed)"
    return None


@dataclass(frozen=True)
class _Ranks:
    world: World
    allow_uneven: bool


def _fenced_leg(
    run_dir: Path,
    snapshot: Path,
    config_path: Path,
    stop: StopRequest,
    faults: Faults | None,
    generation: int | None,
    ranks: _Ranks,
) -> LegResult:
    """_run_leg under the leg's fence: Fenced, raised by any commit once a newer leg exists, ends it (exit 76)."""
    layout = RunLayout(run_dir)
    stats = LegStats()
    problem = run_dir_problem(layout)
    if problem is None and generation is not None:
        problem = _fence_problem(layout)
    if problem is not None:
        log.error("invalid input: %s", problem)
        return LegResult(ExitCode.INVALID_INPUT, problem, stats)
    fence = fencing.Fence(layout, generation) if generation is not None else fencing.NO_FENCE
    try:
        with fencing.guarding(fence):
            fence.check("start")
            return _run_leg(layout, snapshot, config_path, stop, faults, stats, ranks)
    except Fenced as exc:
        log.error("%s: committed nothing from %s on; exiting", exc, exc.what or "the fence check")
        return LegResult(ExitCode.FENCED, str(exc), stats)


def _fence_problem(layout: RunLayout) -> str | None:
    """Why a fenced leg cannot read its run's fence.json (a symlink, not a fence), or None."""
    try:
        fencing.read_fence(layout)
    except SymlinkRefused:
        return f"--run-dir {layout.run_dir}: {layout.fence_path} is a symlink (never followed)"
    except FenceUnreadable as exc:
        return str(exc)
    except OSError as exc:
        return f"--run-dir {layout.run_dir}: {layout.fence_path} unreadable ({exc.strerror or exc})"
    return None


def _run_leg(
    layout: RunLayout,
    snapshot: Path,
    config_path: Path,
    stop: StopRequest,
    faults: Faults | None,
    stats: LegStats,
    ranks: _Ranks,
) -> LegResult:
    reporter = reporter_for(layout, ranks.world)
    try:
        reporter.update(state="starting", message="checking inputs")
        leg_faults = faults if faults is not None else Faults.from_env()
        with injected(leg_faults):  # what the checkpoint writer thread sees (faults.active)
            code, message = _run(layout, snapshot, config_path, stop, leg_faults, reporter, stats, ranks)
    except InvalidInput as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("invalid input: %s", message)
        reporter.update(state="invalid", message=message)
        return LegResult(ExitCode.INVALID_INPUT, message, stats)
    except Preempted as exc:
        log.warning("preempted: %s", exc)
        reporter.update(state="preempted", message=str(exc))
        return LegResult(ExitCode.PREEMPTED, str(exc), stats)
    except Fenced:
        raise
    except Exception as exc:
        if fencing.active().superseded():
            fencing.check(f"the report of {type(exc).__name__}")  # raises Fenced: superseded, not failed
        log.exception("failed: %s: %s", type(exc).__name__, exc)
        message = failure_message(exc)
        with contextlib.suppress(Exception):
            reporter.update(state="failed", message=message)
        return LegResult(ExitCode.FAILED, message, stats)
    return LegResult(code, message, stats)


def failure_message(exc: BaseException) -> str:
    """'<ExceptionType>: <first line of its message>', or the type alone for an exception without one."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _run(
    layout: RunLayout,
    snapshot: Path,
    config_path: Path,
    stop: StopRequest,
    faults: Faults,
    reporter: Reporter,
    stats: LegStats,
    ranks: _Ranks,
) -> tuple[ExitCode, str]:
    config = load_config(config_path)
    world = ranks.world
    done = finished_run(layout, config, config_path)
    if done is not None:
        message = f"already complete: final model at {layout.final_dir} (step {done.step})"
        log.info("start: %s", message)
        reporter.update(state="completed", step=done.step, total_steps=done.step, message=message)
        return ExitCode.COMPLETE, message
    dataset = data_mod.load_snapshot(snapshot, config)
    check_run_matches(layout, config, config_path, dataset.info.content_sha256)

    # Inputs are good; from here on torch does the work.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    from trainer import checkpoint as ckpt
    from trainer import modeling
    from trainer.checkpoint_policy import CheckpointPolicy, RunFacts, eval_tracker
    from trainer.loop import TrainingLoop

    modeling.quiet_transformers()
    device, use_bf16 = _set_up_torch(config, world)
    world.start(device)  # every rank has passed the same input checks: from here on they act together

    # The order below is the one DETERMINISM.md found bit-exact: model built (seeded) -> train mode ->
    # optimizer and scheduler built -> states loaded -> RNGs restored last.
    if world.is_main:
        _remove_stale_run_temps(layout)
        tokenizer = modeling.run_tokenizer(layout.run_dir, config, dataset.info.content_sha256, dataset.train.texts)
        world.barrier()  # the run's tokenizer is saved: the other ranks load it
    else:
        world.barrier()
        tokenizer = modeling.run_tokenizer(layout.run_dir, config, dataset.info.content_sha256, dataset.train.texts)
    model = modeling.build_model(config, tokenizer)
    train_data = data_mod.encode(tokenizer, dataset.train, config.max_seq_length)
    eval_data = data_mod.encode(tokenizer, dataset.eval, config.max_seq_length)

    verified = _rank_checkpoint(layout, config, config_path, ckpt.REQUIRED_FILES, world)
    latest = verified.info if verified is not None else None
    made_by = int(latest.extra.get("world_size", 1)) if latest else world.size
    global_micro_batches = (
        int(latest.extra.get("global_micro_batches", config.gradient_accumulation_steps))
        if latest
        else config.gradient_accumulation_steps * world.size
    )
    # A new run draws dropout per micro-batch; one resumed from a checkpoint made before keeps its one stream.
    dropout_rng = latest.extra.get("dropout_rng") if latest else MICRO_BATCH_DROPOUT
    per_rank = accumulation_for(global_micro_batches, world, allow_uneven=ranks.allow_uneven, made_by=made_by)
    micro_batches_per_epoch = data_mod.micro_batches_per_epoch(train_data.rows, config.batch_size)
    steps_per_epoch = -(-micro_batches_per_epoch // global_micro_batches)
    plan = Plan(
        total_steps=config.max_steps or config.epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        micro_batches_per_epoch=micro_batches_per_epoch,
        accumulation=global_micro_batches,
    )
    world_note = ""
    if world.distributed or made_by != world.size:
        world_note = (
            f"{world.size} process(es), {per_rank} micro-batch(es) of {config.batch_size} each per step: "
            f"global batch {config.batch_size * global_micro_batches}"
        )
        if made_by != world.size:
            since = latest.step if latest else 0
            changed = f"world size changed {made_by} -> {world.size} since checkpoint step {since}"
            world_note = f"{changed}; {world_note} kept"
            log.warning("%s", world_note)

    # A resumed run keeps the AdamW implementation it started with (trainer.optimizer: they round differently).
    resumed_optimizer = _checkpoint_optimizer(verified) if verified is not None else None
    learner = _learner(model, config, plan, device, use_bf16, resumed_optimizer)
    totals = Totals()
    tracker = eval_tracker(config)  # the evaluations during training, resumed with the rest (issue 15)
    resumed_from: int | None = None
    if verified is not None:
        _restore(verified, learner, totals, plan, snapshot, tracker, world, config.seed)
        resumed_from = totals.step
        del verified  # the optimizer keeps what it needs; the rest of the verified bytes can go
    else:
        world.reseed_follower(config.seed)  # ranks > 0 draw their own dropout masks

    policy = CheckpointPolicy(
        layout=layout,
        config=config,
        plan=plan,
        learner=learner,
        totals=totals,
        facts=RunFacts(train_data.rows, dataset.info.content_sha256, torch.__version__),
        last_saved_step=latest.step if latest else None,
        reporter=reporter,
        stats=stats,
        tracker=tracker,
        world=world,
        dropout_rng=dropout_rng,
    )
    try:
        reporter.begin(
            total_steps=plan.total_steps,
            steps_per_epoch=plan.steps_per_epoch,
            batch_size=config.batch_size * global_micro_batches,
            step=totals.step,
            resumed_from=resumed_from,
            last_checkpoint_step=latest.step if latest else None,
            log_every=config.log_every_steps,
        )
        _log_start(config, plan, learner, resumed_from)
        if world_note:  # the leg log's line, and progress.json's message
            log.info("data-parallel: %s", world_note)
            reporter.update(message=f"{reporter.fields['message']}; {world_note}")
        stats.start_step = totals.step
        loop = TrainingLoop(
            config=config,
            plan=plan,
            learner=learner,
            totals=totals,
            policy=policy,
            reporter=reporter,
            stats=stats,
            stop=stop,
            faults=faults,
            train_data=train_data,
            eval_data=eval_data,
            world=world,
            micro_batch_dropout=dropout_rng == MICRO_BATCH_DROPOUT,
        )
        loop.run_steps()
        if loop.stopped:
            return finish_preempted(stop, totals.step, policy, config, reporter)
        return loop.complete(layout, tokenizer)
    finally:
        with contextlib.suppress(Exception):
            policy.close()


def _rank_checkpoint(
    layout: RunLayout, config: TrainerConfig, config_path: Path, required_files: tuple[str, ...], world: World
) -> VerifiedCheckpoint | None:
    """The checkpoint every rank resumes from: rank 0 searches (and quarantines), the others open the step it
    found once it says which (broadcast), verifying its hashes themselves."""
    from trainer.volume.manifests import open_verified_checkpoint

    verified = _newest_verified_checkpoint(layout, config, config_path, required_files) if world.is_main else None
    step = world.broadcast_int(verified.info.step if verified is not None else -1)
    if world.is_main or step < 0:
        return verified
    folder = layout.checkpoints_dir / checkpoint_dir_name(step)
    return open_verified_checkpoint(folder, required_files=required_files)


def _set_up_torch(config: TrainerConfig, world: World | None = None) -> tuple[Any, bool]:
    """Pin the thread count, pick the device, make CUDA deterministic; returns (device, bf16 autocast)."""
    import torch

    torch.set_num_threads(config.torch_threads)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device: cuda requested but no CUDA device is visible")
    device = torch.device("cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and world is not None and world.distributed:
        device = torch.device("cuda", world.local_rank)  # one GPU per rank (torchrun's LOCAL_RANK)
        torch.cuda.set_device(device)
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return device, use_bf16


def _learner(
    model: Any,
    config: TrainerConfig,
    plan: Plan,
    device: Any,
    bf16: bool,
    optimizer_implementation: Implementation | None = None,
) -> Learner:
    """The model on its device in train mode, with AdamW (no decay for biases and norms; the fastest
    implementation the device has, or `optimizer_implementation`, the resumed run's) and the linear warm-up
    schedule built on it: both before any state is loaded (DETERMINISM.md)."""
    from transformers import get_linear_schedule_with_warmup

    from trainer.optimizer import build_adamw

    model.to(device)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = build_adamw(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        device=device,
        implementation=optimizer_implementation,
    )
    warmup_steps = math.ceil(config.warmup_ratio * plan.total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, plan.total_steps)
    return Learner(model=model, optimizer=optimizer, scheduler=scheduler, device=device, bf16=bf16)


def _checkpoint_optimizer(verified: VerifiedCheckpoint) -> Implementation:
    """The AdamW implementation `verified` was made with, read from its optimizer.json param groups."""
    from trainer import checkpoint as ckpt
    from trainer.optimizer import implementation_of

    meta = json.loads(bytes(verified.contents[ckpt.OPTIMIZER_META_FILE]))
    return implementation_of(meta["param_groups"])


def _newest_verified_checkpoint(
    layout: RunLayout, config: TrainerConfig, config_path: Path, required_files: tuple[str, ...]
) -> VerifiedCheckpoint | None:
    """Clear half-written checkpoints, find the newest verified one, quarantine anything newer and bad."""
    removed = remove_stale_temp_dirs(layout.checkpoints_dir, fencing.active().generation)
    for path in removed:
        log.info("removed half-written %s (left by a killed writer)", path.name)
    # Each file is read once: hashed, and loaded by _restore from the very bytes that were hashed.
    verified, rejected = find_latest_verified(
        layout.checkpoints_dir,
        quarantine_dir=layout.quarantine_dir,
        required_files=required_files,
        accept=lambda found: check_self_consistent(found.info, lambda name: json.loads(bytes(found.contents[name]))),
    )
    for bad in rejected:
        log.warning("checkpoint step %d quarantined to %s: %s", bad.step, bad.path, bad.reason)
    if verified is not None and verified.info.config_hash != config.identity_hash():
        raise InvalidInput(f"config {config_path}: differs from the one {verified.info.path} was made with")
    return verified


def _restore(
    verified: VerifiedCheckpoint,
    learner: Learner,
    totals: Totals,
    plan: Plan,
    snapshot: Path,
    tracker: EvalTracker,
    world: World | None = None,
    seed: int = 0,
) -> None:
    """Load weights, optimizer state, scheduler state, totals and the evaluation record from `verified`, then
    every RNG, last: nothing may draw from the RNGs between this and the next step (DETERMINISM.md)."""
    from trainer import checkpoint as ckpt

    loaded = ckpt.load_checkpoint(verified)
    state = loaded.trainer_state
    if state["total_steps"] != plan.total_steps or state["steps_per_epoch"] != plan.steps_per_epoch:
        raise InvalidInput(
            f"snapshot {snapshot}: {verified.info.path} was made for {state['total_steps']} steps of "
            f"{state['steps_per_epoch']} per epoch, this data gives {plan.total_steps} of {plan.steps_per_epoch}"
        )
    learner.model.load_state_dict({k: v.to(learner.device) for k, v in loaded.model.items()})
    learner.optimizer.load_state_dict(loaded.optimizer)
    learner.scheduler.load_state_dict(state["scheduler"])
    totals.restore(state)
    tracker.restore(state.get("evaluation"))  # absent in checkpoints made before evaluations during training
    world = world or World()
    if world.is_main:
        ckpt.restore_rng(loaded.rng)  # last: nothing draws from the RNGs before the next step
    elif ckpt.rank_rng_file(world.rank) in verified.contents:
        ckpt.restore_rng(json.loads(bytes(verified.contents[ckpt.rank_rng_file(world.rank)])))
    else:  # a rank the checkpoint's (smaller) world did not have: a stream of its own from here
        world.reseed_follower(seed, totals.step)


def _log_start(config: TrainerConfig, plan: Plan, learner: Learner, resumed_from: int | None) -> None:
    from trainer.optimizer import implementation_of

    where = f"{learner.device.type} {learner.precision} | AdamW {implementation_of(learner.optimizer.param_groups)}"
    if resumed_from is None:
        log.info(
            "start: fresh run (no checkpoint) | %d steps = %s x %d steps/epoch | model %s | %d threads | %s",
            plan.total_steps,
            f"{config.epochs} epochs"
            if not config.max_steps
            else f"{plan.total_steps / plan.steps_per_epoch:.2f} epochs",
            plan.steps_per_epoch,
            config.model,
            config.torch_threads,
            where,
        )
    else:
        log.info(
            "start: resumed from checkpoint step %d (epoch %d, batch %d) of %d steps | model %s | %d threads | %s",
            resumed_from,
            plan.epoch(resumed_from),
            plan.first_micro_batch(resumed_from),
            plan.total_steps,
            config.model,
            config.torch_threads,
            where,
        )
