"""One training leg: check the inputs, resume from the newest verified checkpoint, train, checkpoint, evaluate.

`run_leg` is what `python -m trainer train` runs. Same arguments always mean "carry on": a finished run
exits 0 at once, a run with checkpoints resumes from the newest verified one, else it starts fresh.
Resume restores, in this order: model built (seeded) -> train mode -> optimizer and scheduler built ->
weights, optimizer state, scheduler state loaded -> every RNG restored last (see DETERMINISM.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from trainer import data as data_mod
from trainer.config import TrainerConfig
from trainer.errors import InvalidInput, Preempted
from trainer.reporting import Reporter, fmt_duration
from trainer.volume import (
    TMP_PREFIX,
    CheckpointInfo,
    CheckpointInvalid,
    ExitCode,
    RunLayout,
    atomic_write_json,
    find_latest_verified,
    fsync_dir,
    list_checkpoint_dirs,
    read_checkpoint,
    read_json,
    remove_stale_temp_dirs,
    write_manifest,
    write_termination_message,
)

log = logging.getLogger("trainer")

MAX_GRAD_NORM = 1.0
RECENT_LOSS_WINDOW = 50
# Test-only hooks (documented in trainer_image/README.md): SIGKILL or SIGTERM this process at a chosen
# step, and slow every step down so that a test can signal it from outside at a random moment.
KILL_AFTER_STEP_ENV = "RELAY_TEST_KILL_AFTER_STEP"
SIGTERM_DURING_STEP_ENV = "RELAY_TEST_SIGTERM_DURING_STEP"
SIGTERM_DURING_EVAL_ENV = "RELAY_TEST_SIGTERM_DURING_EVAL"
STEP_SLEEP_ENV = "RELAY_TEST_STEP_SLEEP_S"


class StopRequest:
    """Set by SIGTERM/SIGINT; the training loop checks it between optimizer steps."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received_at: float | None = None
        self.signal_name = ""

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        if not self.event.is_set():
            self.received_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name
            self.event.set()

    def install(self) -> dict[int, Any]:
        """Install the handlers; returns the previous ones (for `restore`)."""
        return {signum: signal.signal(signum, self.handler) for signum in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def restore(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass
class LegStats:
    """Timings of one leg, for the benchmark and the final log line."""

    start_step: int = 0
    end_step: int = 0
    step_seconds: list[float] = field(default_factory=list)
    stall_seconds: list[float] = field(default_factory=list)  # training thread time per checkpoint
    checkpoint_bytes: int = 0
    train_seconds: float = 0.0
    samples: int = 0


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
    for _, folder in reversed(list_checkpoint_dirs(layout.checkpoints_dir)):
        try:
            info = read_checkpoint(folder, verify_hashes=False)
        except CheckpointInvalid:
            continue  # the verified search quarantines it later
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
        raise InvalidInput(f"config {config_path}: differs from the one {layout.final_dir} was made with")
    return info


def _remove_stale_run_temps(layout: RunLayout) -> None:
    if layout.run_dir.is_dir():
        for path in layout.run_dir.iterdir():
            if path.is_dir() and path.name.startswith((f"{TMP_PREFIX}final", f"{TMP_PREFIX}tokenizer")):
                shutil.rmtree(path, ignore_errors=True)


def run_leg(
    run_dir: Path, snapshot: Path, config_path: Path, *, stop: StopRequest | None = None, install_signals: bool = True
) -> LegResult:
    """Run one leg to its end; never raises for the documented outcomes (see ExitCode).

    On failure (exit 1) and invalid input (exit 65) the one-line reason also goes to the termination-message
    file named by $RELAY_TERMINATION_LOG, when set (see volume.write_termination_message).
    """
    stop = stop or StopRequest()
    previous_handlers = stop.install() if install_signals else {}
    try:
        result = _run_leg(run_dir, snapshot, config_path, stop)
    finally:
        StopRequest.restore(previous_handlers)
    if result.exit_code in (ExitCode.FAILED, ExitCode.INVALID_INPUT):
        write_termination_message(result.message)
    return result


def _run_leg(run_dir: Path, snapshot: Path, config_path: Path, stop: StopRequest) -> LegResult:
    layout = RunLayout(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(layout)
    stats = LegStats()
    try:
        reporter.update(state="starting", message="checking inputs")
        code, message = _run(layout, snapshot, config_path, stop, reporter, stats)
    except InvalidInput as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("invalid input: %s", message)
        reporter.update(state="invalid", message=message)
        return LegResult(ExitCode.INVALID_INPUT, message, stats)
    except Preempted as exc:
        log.warning("preempted: %s", exc)
        reporter.update(state="preempted", message=str(exc))
        return LegResult(ExitCode.PREEMPTED, str(exc), stats)
    except Exception as exc:
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
    layout: RunLayout, snapshot: Path, config_path: Path, stop: StopRequest, reporter: Reporter, stats: LegStats
) -> tuple[ExitCode, str]:
    config = load_config(config_path)
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

    modeling.quiet_transformers()
    torch.set_num_threads(config.torch_threads)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device: cuda requested but no CUDA device is visible")
    device = torch.device("cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    _remove_stale_run_temps(layout)
    tokenizer = modeling.run_tokenizer(layout.run_dir, config, dataset.info.content_sha256, dataset.train.texts)
    model = modeling.build_model(config, tokenizer)
    train_data = data_mod.encode(tokenizer, dataset.train, config.max_seq_length)
    eval_data = data_mod.encode(tokenizer, dataset.eval, config.max_seq_length)

    micro_per_epoch = data_mod.micro_batches_per_epoch(train_data.rows, config.batch_size)
    steps_per_epoch = data_mod.steps_per_epoch(train_data.rows, config.batch_size, config.gradient_accumulation_steps)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)

    # Checkpoints: clear half-written ones, find the newest verified one, quarantine anything newer and bad.
    removed = remove_stale_temp_dirs(layout.checkpoints_dir)
    for path in removed:
        log.info("removed half-written %s (left by a killed writer)", path.name)
    # Each file is read once: hashed, and loaded below from the very bytes that were hashed.
    verified, rejected = find_latest_verified(
        layout.checkpoints_dir, quarantine_dir=layout.quarantine_dir, required_files=ckpt.REQUIRED_FILES
    )
    latest = verified.info if verified is not None else None
    for bad in rejected:
        log.warning("checkpoint step %d quarantined to %s: %s", bad.step, bad.path, bad.reason)
    if latest is not None and latest.config_hash != config.identity_hash():
        raise InvalidInput(f"config {config_path}: differs from the one {latest.path} was made with")

    model.to(device)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)

    step = 0
    loss_sum = 0.0
    samples_seen = 0
    recent_losses: deque[float] = deque(maxlen=RECENT_LOSS_WINDOW)
    resumed_from: int | None = None
    if verified is not None:
        loaded = ckpt.load_checkpoint(verified)
        state = loaded.trainer_state
        if state["total_steps"] != total_steps or state["steps_per_epoch"] != steps_per_epoch:
            raise InvalidInput(
                f"snapshot {snapshot}: {verified.info.path} was made for {state['total_steps']} steps of "
                f"{state['steps_per_epoch']} per epoch, this data gives {total_steps} of {steps_per_epoch}"
            )
        model.load_state_dict({k: v.to(device) for k, v in loaded.model.items()})
        optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        loss_sum = float(state["loss_sum"])
        samples_seen = int(state["samples_seen"])
        recent_losses.extend(float(x) for x in state["recent_losses"])
        ckpt.restore_rng(loaded.rng)  # last: nothing draws from the RNGs before the next step
        resumed_from = step
        del loaded, verified  # the optimizer keeps what it needs; the rest of the bytes can go

    config_json = config.to_json_text()
    identity = config.identity_hash()
    writer = ckpt.AsyncCheckpointWriter(layout.checkpoints_dir, config.keep_last)
    reporter.begin(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        batch_size=config.batch_size * config.gradient_accumulation_steps,
        step=step,
        resumed_from=resumed_from,
        last_checkpoint_step=latest.step if latest else None,
        log_every=config.log_every_steps,
    )
    if latest is None:
        log.info(
            "start: fresh run (no checkpoint) | %d steps = %s x %d steps/epoch | model %s | %d threads | %s %s",
            total_steps,
            f"{config.epochs} epochs" if not config.max_steps else f"{total_steps / steps_per_epoch:.2f} epochs",
            steps_per_epoch,
            config.model,
            config.torch_threads,
            device.type,
            "bf16" if use_bf16 else "fp32",
        )
    else:
        log.info(
            "start: resumed from checkpoint step %d (epoch %d, batch %d) of %d steps | model %s | %d threads | %s %s",
            step,
            step // steps_per_epoch,
            (step % steps_per_epoch) * config.gradient_accumulation_steps,
            total_steps,
            config.model,
            config.torch_threads,
            device.type,
            "bf16" if use_bf16 else "fp32",
        )
    stats.start_step = step

    def trainer_state(at_step: int) -> dict[str, Any]:
        return {
            "step": at_step,
            "epoch": at_step // steps_per_epoch,
            "batch_in_epoch": (at_step % steps_per_epoch) * config.gradient_accumulation_steps,
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "micro_batches_per_epoch": micro_per_epoch,
            "data_order": "trainer.data.epoch_batches(lengths, batch_size, seed, epoch), generator seed*1000003+epoch",
            "seed": config.seed,
            "train_rows": train_data.rows,
            "loss_sum": loss_sum,
            "samples_seen": samples_seen,
            "recent_losses": list(recent_losses),
            "torch_threads": config.torch_threads,
            "device": device.type,
            "precision": "bf16" if use_bf16 else "fp32",
            "snapshot_sha256": dataset.info.content_sha256,
            "torch_version": torch.__version__,
        }

    def checkpoint_now(at_step: int, *, emergency: bool = False) -> ckpt.HostState:
        mean_recent = sum(recent_losses) / len(recent_losses) if recent_losses else float("nan")
        state = trainer_state(at_step)
        return ckpt.capture(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_state=state,
            config_json=config_json,
            config_hash=identity,
            metrics={
                "loss": mean_recent,
                "train_loss": loss_sum / at_step if at_step else float("nan"),
                "learning_rate": scheduler.get_last_lr()[0],
            },
            extra={
                key: state[key]
                for key in (
                    "batch_in_epoch",
                    "total_steps",
                    "steps_per_epoch",
                    "torch_threads",
                    "snapshot_sha256",
                    "samples_seen",
                    "device",
                )
            }
            | {"emergency": emergency},
            buffers=writer.buffers,
        )

    def note_saved(info: CheckpointInfo | None, stall: float | None = None) -> None:
        if info is None:
            return
        stats.checkpoint_bytes = info.total_bytes
        reporter.checkpoint_saved(info, stall)

    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    )
    kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "-1"))
    sigterm_during = int(os.environ.get(SIGTERM_DURING_STEP_ENV, "-1"))
    step_sleep = float(os.environ.get(STEP_SLEEP_ENV, "0") or 0)

    last_checkpoint_time = time.monotonic()
    last_saved_step = latest.step if latest else -1
    lengths = [len(ids) for ids in train_data.input_ids]
    batches: list[list[int]] = []
    order_epoch = -1
    leg_started = time.perf_counter()
    params = list(model.parameters())
    try:
        if stop.requested:
            raise Preempted(f"{stop.signal_name} during start-up; no step taken in this leg, none lost")
        while step < total_steps and not stop.requested:
            step_started = time.perf_counter()
            epoch = step // steps_per_epoch
            if epoch != order_epoch:
                batches = data_mod.epoch_batches(lengths, config.batch_size, config.seed, epoch)
                order_epoch = epoch
            first_micro = (step % steps_per_epoch) * config.gradient_accumulation_steps
            last_micro = min(first_micro + config.gradient_accumulation_steps, micro_per_epoch)
            micro_count = last_micro - first_micro
            step_loss = 0.0
            step_samples = 0
            for micro in range(first_micro, last_micro):
                indices = batches[micro]
                batch = {k: v.to(device, non_blocking=True) for k, v in data_mod.collate(train_data, indices).items()}
                with autocast():
                    outputs = model(**batch)
                loss = outputs.loss / micro_count
                loss.backward()
                step_loss += float(loss.item())
                step_samples += len(indices)
                if step + 1 == sigterm_during and micro == first_micro:
                    os.kill(os.getpid(), signal.SIGTERM)  # test hook: the signal lands mid-step
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            waited = writer.wait_copied()  # a checkpoint's copy of the weights must finish before they change
            if waited and stats.stall_seconds:
                stats.stall_seconds[-1] += waited
                if last_saved_step in reporter.stalls:
                    reporter.stalls[last_saved_step] = stats.stall_seconds[-1]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum += step_loss
            samples_seen += step_samples
            recent_losses.append(step_loss)
            if step_sleep:
                time.sleep(step_sleep)
            stats.step_seconds.append(time.perf_counter() - step_started)
            stats.samples += step_samples
            note_saved(writer.poll())
            reporter.step_done(step, step_loss, scheduler.get_last_lr()[0], step_samples)
            if step == kill_after:
                log.info("test hook %s: SIGKILL after step %d", KILL_AFTER_STEP_ENV, step)
                os.kill(os.getpid(), signal.SIGKILL)
            if stop.requested:
                break
            due = (config.checkpoint_every_steps is not None and step % config.checkpoint_every_steps == 0) or (
                config.checkpoint_every_seconds is not None
                and time.monotonic() - last_checkpoint_time >= config.checkpoint_every_seconds
            )
            if due and step < total_steps:
                stall_started = time.perf_counter()
                note_saved(writer.wait())  # at most one write in flight
                writer.submit(checkpoint_now(step))  # the state is copied here; the files are written off-thread
                stall = time.perf_counter() - stall_started
                stats.stall_seconds.append(stall)
                reporter.stalls[step] = stall
                last_checkpoint_time = time.monotonic()
                last_saved_step = step

        stats.end_step = step
        stats.train_seconds = time.perf_counter() - leg_started
        if stop.requested:
            return _preempt(stop, step, writer, checkpoint_now, note_saved, last_saved_step, config, reporter)
        # Training complete: the last step is always checkpointed before evaluation, so a preemption
        # during evaluation or the final save resumes straight into evaluation.
        note_saved(writer.wait())
        if last_saved_step != step:
            reporter.update(state="checkpointing")
            note_saved(writer.save_now(checkpoint_now(step)))
        writer.close()
        if stop.requested:
            raise Preempted(f"{stop.signal_name} after the last step; checkpoint step {step} holds it")
        reporter.update(state="evaluating", message="evaluating on the eval split")
        log.info("evaluating on %d eval rows", eval_data.rows)
        eval_metrics = evaluate(model, eval_data, config, device, autocast, stop)
        reporter.history(
            step=total_steps,
            epoch=round(total_steps / steps_per_epoch, 4),
            eval_loss=eval_metrics["loss"],
            eval_accuracy=eval_metrics["accuracy"],
        )
        metrics = {
            **eval_metrics,
            "train_loss": loss_sum / total_steps,
            "steps": total_steps,
            "epochs": total_steps / steps_per_epoch,
            "train_rows": train_data.rows,
        }
        write_final(layout, model, tokenizer, metrics, identity, total_steps, (total_steps - 1) // steps_per_epoch)
        message = (
            f"complete: eval accuracy {metrics['accuracy']:.4f} f1_macro {metrics['f1_macro']:.4f} "
            f"loss {metrics['loss']:.4f} | train_loss {metrics['train_loss']:.4f} | final model at {layout.final_dir}"
        )
        log.info(message)
        reporter.update(state="completed", message=message, step=total_steps)
        return ExitCode.COMPLETE, message
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _preempt(
    stop: StopRequest,
    step: int,
    writer: Any,
    checkpoint_now: Any,
    note_saved: Any,
    last_saved_step: int,
    config: TrainerConfig,
    reporter: Reporter,
) -> tuple[ExitCode, str]:
    """SIGTERM: the current step is finished; wait for any write in flight, save this step, exit 75."""
    reporter.update(state="checkpointing", message=f"{stop.signal_name}: saving step {step}")
    note_saved(writer.wait())
    if last_saved_step != step:
        note_saved(writer.save_now(checkpoint_now(step, emergency=True)))
    writer.close()
    elapsed = time.monotonic() - (stop.received_at or time.monotonic())
    within = "within" if elapsed <= config.sigterm_grace_seconds else "OVER"
    message = (
        f"preempted: {stop.signal_name} received; finished step {step} and saved checkpoint step {step} "
        f"{fmt_duration(elapsed)} after the signal ({within} the {config.sigterm_grace_seconds:g} s grace)"
    )
    log.warning(message)
    reporter.update(state="preempted", message=message, step=step)
    return ExitCode.PREEMPTED, message


def evaluate(model: Any, data: data_mod.Encoded, config: TrainerConfig, device: Any, autocast: Any, stop: StopRequest):
    """Accuracy, macro F1 (over labels present in truth or predictions) and mean cross-entropy."""
    import torch
    import torch.nn.functional as functional

    model.eval()
    total_loss = 0.0
    predictions: list[int] = []
    sigterm_hook = os.environ.get(SIGTERM_DURING_EVAL_ENV) == "1"
    with torch.no_grad():
        for indices in data_mod.eval_batches(data, config.eval_batch_size):
            if sigterm_hook:
                os.kill(os.getpid(), signal.SIGTERM)  # test hook: the signal lands during evaluation
                sigterm_hook = False
            if stop.requested:
                raise Preempted(f"{stop.signal_name} during evaluation; checkpoint of the last step holds the run")
            batch = {k: v.to(device) for k, v in data_mod.collate(data, indices).items()}
            labels = batch.pop("labels")
            with autocast():
                logits = model(**batch).logits.float()
            total_loss += float(functional.cross_entropy(logits, labels, reduction="sum").item())
            predictions.extend(int(p) for p in logits.argmax(dim=-1).tolist())
    model.train()
    return classification_metrics(data.labels, predictions) | {"loss": total_loss / data.rows, "eval_rows": data.rows}


def classification_metrics(truth: list[int], predictions: list[int]) -> dict[str, float]:
    correct = sum(t == p for t, p in zip(truth, predictions, strict=True))
    f1_scores = []
    for label in sorted(set(truth) | set(predictions)):
        tp = sum(t == label and p == label for t, p in zip(truth, predictions, strict=True))
        fp = sum(t != label and p == label for t, p in zip(truth, predictions, strict=True))
        fn = sum(t == label and p != label for t, p in zip(truth, predictions, strict=True))
        f1_scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": correct / len(truth), "f1_macro": sum(f1_scores) / len(f1_scores)}


def write_final(
    layout: RunLayout, model: Any, tokenizer: Any, metrics: dict[str, Any], identity: str, step: int, epoch: int
) -> None:
    """save_pretrained model + tokenizer + metrics.json into a temp folder, manifest last, rename to final/."""
    tmp = layout.run_dir / f"{TMP_PREFIX}final.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    atomic_write_json(tmp / "metrics.json", metrics)
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    write_manifest(tmp, step=step, epoch=epoch, config_hash=identity, metrics=numeric, extra={"kind": "final"})
    fsync_dir(tmp)
    if layout.final_dir.exists():
        shutil.rmtree(layout.final_dir)
    os.replace(tmp, layout.final_dir)
    fsync_dir(layout.run_dir)


def read_final_metrics(layout: RunLayout) -> dict[str, Any]:
    return dict(read_json(layout.final_dir / "metrics.json"))
