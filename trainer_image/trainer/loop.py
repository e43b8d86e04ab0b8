"""The training loop of one leg: optimizer steps with gradient accumulation, evaluations every evalEverySteps,
then the end of training (the last step checkpointed, evaluation, the final model written).

Nothing here draws from the global RNGs except the model's forward pass (dropout): the data order is derived
from (seed, epoch) with a private generator (data.epoch_batches), so a resumed leg continues the same streams;
evaluation forks the torch RNG (evaluation.evaluate), so evaluating changes no weight.

An evaluation during training comes after its step and before the step's checkpoint, which then carries its
metrics. A stop request during it ends the leg like one between steps (the step is saved, exit 75); the next
leg evaluates that step first, before any further step. earlyStoppingPatience ends the loop early: the run then
completes at that step (final/ written, the reason in metrics.json and the message).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from trainer import data as data_mod
from trainer.checkpoint_policy import CheckpointPolicy
from trainer.config import TrainerConfig
from trainer.distributed import World, micro_batch_rng, rank_micro_batches
from trainer.errors import Preempted
from trainer.evaluation import evaluate, named_metrics
from trainer.faults import Faults
from trainer.leg_state import Learner, LegStats, Plan, Totals
from trainer.preemption import StopRequest
from trainer.reporting import Reporter
from trainer.volume import TMP_PREFIX, ExitCode, RunLayout, atomic_write_json, fencing, fsync_dir, write_manifest
from trainer.volume.layout import checkpoint_dir_name
from trainer.volume.manifests import open_verified_checkpoint

log = logging.getLogger("trainer")

MAX_GRAD_NORM = 1.0


@dataclass
class TrainingLoop:
    """Advances `totals` step by step; checkpoints through `policy`; stops between steps when `stop` is set."""

    config: TrainerConfig
    plan: Plan
    learner: Learner
    totals: Totals
    policy: CheckpointPolicy
    reporter: Reporter
    stats: LegStats
    stop: StopRequest
    faults: Faults
    train_data: data_mod.Encoded
    eval_data: data_mod.Encoded
    world: World = field(default_factory=World)
    micro_batch_dropout: bool = False  # dropout masks per micro-batch (distributed.micro_batch_rng): new runs
    _agreed_stop: bool = False

    @property
    def stopped(self) -> bool:
        """Whether the loop stops for a stop request: the request itself for one process; with several, the
        request as the ranks agreed on it at the last step boundary (a signal after it waits for the next)."""
        return self._agreed_stop if self.world.distributed else self.stop.requested

    def _agree(self, due: bool = False) -> bool:
        """With several ranks: a stop request on any rank stops all of them at this step boundary (all-reduce
        MAX, each step), and a checkpoint due on any (checkpointEverySeconds) is taken by all. Returns `due`."""
        if not self.world.distributed:
            return due
        stop, due = self.world.agree(self.stop.requested, due)
        if stop and not self.stop.requested:
            self.stop.set_by_peer()
        self._agreed_stop = stop
        return due

    def run_steps(self) -> None:
        """Optimizer steps until the plan's last one or a stop request (the step in progress is finished first;
        the caller then saves it). Raises Preempted for a stop that came before the first step."""
        import torch

        config, plan, totals, stats, train_data = self.config, self.plan, self.totals, self.stats, self.train_data
        model, optimizer, scheduler = self.learner.model, self.learner.optimizer, self.learner.scheduler
        lengths = [len(ids) for ids in train_data.input_ids]
        batches: list[list[int]] = []
        order_epoch = -1
        leg_started = time.perf_counter()
        params = list(model.parameters())
        self._agree()
        if self.stopped:
            raise Preempted(f"{self.stop.signal_name} during start-up; no step taken in this leg, none lost")
        tracker = self.policy.tracker
        if tracker.pending(totals.step, plan.total_steps) and self._evaluate(totals.step) and self.world.is_main:
            self.policy.evaluated_after_saving(totals.step)  # the leg before stopped during this evaluation
        while totals.step < plan.total_steps and not self.stopped and not tracker.should_stop:
            step_started = time.perf_counter()
            epoch = plan.epoch(totals.step)
            if epoch != order_epoch:
                batches = data_mod.epoch_batches(lengths, config.batch_size, config.seed, epoch)
                order_epoch = epoch
            micro_batches = plan.micro_batches(totals.step)  # the step's global share of the epoch's order
            step_loss = 0.0
            step_samples = 0
            for index, micro in enumerate(rank_micro_batches(micro_batches, self.world)):
                indices = batches[micro]
                batch = {
                    k: v.to(self.learner.device, non_blocking=True)
                    for k, v in data_mod.collate(train_data, indices).items()
                }
                rng = (
                    micro_batch_rng(config.seed, epoch, micro, self.learner.device)
                    if self.micro_batch_dropout
                    else contextlib.nullcontext()
                )
                with self.learner.autocast(), rng:
                    outputs = model(**batch)
                loss = outputs.loss / len(micro_batches)
                loss.backward()
                step_loss += float(loss.item())
                step_samples += len(indices)
                self.faults.during_step(totals.step + 1, index)
            if self.world.distributed:
                self.world.sum_gradients(params)  # every rank now holds the step's whole gradient
                step_loss, samples = self.world.sum_floats(step_loss, step_samples)
                step_samples = int(samples)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            self.policy.before_optimizer_step()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            totals.add_step(step_loss, step_samples)
            self.faults.slow_step()
            stats.step_seconds.append(time.perf_counter() - step_started)
            stats.samples += step_samples
            self.policy.poll()
            self.reporter.step_done(totals.step, step_loss, self.learner.learning_rate, step_samples)
            self.faults.after_step(totals.step)
            checkpoint_due = self._agree(self.policy.due(totals.step))
            if self.stopped:
                break
            if tracker.due(totals.step, plan.total_steps) and not self._evaluate(totals.step):
                break  # stopped during the evaluation: the caller saves this step, the next leg evaluates it
            if checkpoint_due:
                self.policy.checkpoint(totals.step)
        stats.end_step = totals.step
        stats.train_seconds = time.perf_counter() - leg_started

    def _evaluate(self, step: int) -> bool:
        """Evaluate the state after `step` steps during training and record it (history, tracker); False when a
        stop request came during it (nothing recorded)."""
        tracker = self.policy.tracker
        self.reporter.update(state="evaluating", message=f"evaluating step {step}")
        started = time.perf_counter()
        # Every rank evaluates (the same eval split: the same record on each, so early stopping agrees); with
        # several ranks a stop request waits for the evaluation's end and is agreed at the next step boundary.
        stop = self.stop if not self.world.distributed else StopRequest()
        try:
            result = evaluate(self.learner, self.eval_data, self.config.eval_batch_size, stop, self.faults)
        except Preempted:
            return False
        finally:
            self.stats.eval_seconds += time.perf_counter() - started
        metrics = named_metrics(result)
        improved = tracker.record(step, metrics)
        self.reporter.evaluated(step, metrics, self.config.metric_for_best, tracker.best_step, improved)
        return True

    def complete(self, layout: RunLayout, tokenizer: Any) -> tuple[ExitCode, str]:
        """Training done (the plan's last step, or an early stop): the last step is checkpointed before
        evaluation, so a preemption during evaluation or the final save resumes straight into evaluation; then
        evaluate (an early stop's step was evaluated already) and write final/ (the best model with
        loadBestAtEnd)."""
        plan, totals, reporter, eval_data = self.plan, self.totals, self.reporter, self.eval_data
        config, tracker = self.config, self.policy.tracker
        last_step = totals.step
        early_stopped = last_step < plan.total_steps and tracker.should_stop
        self.policy.save_last(last_step)
        if not self.world.is_main:  # rank 0 evaluates and writes final/
            return ExitCode.COMPLETE, f"rank {self.world.rank}: training complete at step {last_step}"
        if self.stop.requested:
            raise Preempted(f"{self.stop.signal_name} after the last step; checkpoint step {last_step} holds it")
        if tracker.evaluated(last_step) and tracker.last is not None:
            eval_metrics: dict[str, Any] = {
                "loss": tracker.last["eval_loss"],
                "accuracy": tracker.last["accuracy"],
                "f1_macro": tracker.last["f1_macro"],
                "eval_rows": eval_data.rows,
            }
        else:
            reporter.update(state="evaluating", message="evaluating on the eval split")
            log.info("evaluating on %d eval rows", eval_data.rows)
            eval_metrics = evaluate(self.learner, eval_data, config.eval_batch_size, self.stop, self.faults)
            if tracker.every_steps is not None:
                tracker.record(last_step, named_metrics(eval_metrics))
            reporter.history(
                step=last_step,
                epoch=round(last_step / plan.steps_per_epoch, 4),
                eval_loss=eval_metrics["loss"],
                eval_accuracy=eval_metrics["accuracy"],
                eval_f1_macro=eval_metrics["f1_macro"],
            )
        best = tracker.best
        model_step = last_step
        if config.load_best_at_end and best is not None and int(best["step"]) != last_step:
            model_step = int(best["step"])
            load_checkpoint_weights(self.learner, layout, model_step)
            eval_metrics = {"loss": best["eval_loss"], "accuracy": best["accuracy"], "f1_macro": best["f1_macro"]}
            eval_metrics["eval_rows"] = eval_data.rows
        metrics: dict[str, Any] = {
            **eval_metrics,
            "train_loss": totals.loss_sum / last_step,
            "steps": last_step,
            "epochs": last_step / plan.steps_per_epoch,
            "train_rows": self.train_data.rows,
        }
        notes = ""
        if config.metric_for_best is not None and best is not None:
            metrics |= {"best_step": int(best["step"]), "model_step": model_step}
            metrics[f"best_{config.metric_for_best}"] = best[config.metric_for_best]
            notes += f" | best step {int(best['step'])} ({config.metric_for_best} {best[config.metric_for_best]:.4f})"
            if model_step != last_step:
                notes += ", its model in final/"
        if early_stopped:
            metrics |= {"stop_reason": EARLY_STOPPED, "stopped_at_step": last_step}
            notes += (
                f" | early stopped at step {last_step} of {plan.total_steps}: {config.metric_for_best} did not "
                f"improve for {tracker.evals_since_best} evaluations"
            )
        write_final(
            layout,
            self.learner.model,
            tokenizer,
            metrics,
            config.identity_hash(),
            last_step,
            plan.epoch(last_step - 1),
        )
        message = (
            f"complete: eval accuracy {metrics['accuracy']:.4f} f1_macro {metrics['f1_macro']:.4f} "
            f"loss {metrics['loss']:.4f} | train_loss {metrics['train_loss']:.4f}{notes} | "
            f"final model at {layout.final_dir}"
        )
        log.info(message)
        reporter.update(state="completed", message=message, step=last_step)
        return ExitCode.COMPLETE, message


# final/metrics.json's "stop_reason" for a run ended by earlyStoppingPatience (the status condition's reason).
EARLY_STOPPED = "EarlyStopped"


def load_checkpoint_weights(learner: Learner, layout: RunLayout, step: int) -> None:
    """Load the model weights of checkpoint `step` (hashes verified) into the learner's model (loadBestAtEnd)."""
    from trainer import checkpoint as ckpt
    from trainer.checkpoint_files import tensors_from_safetensors

    folder = layout.checkpoints_dir / checkpoint_dir_name(step)
    verified = open_verified_checkpoint(folder, required_files=(ckpt.MODEL_FILE,))
    weights = tensors_from_safetensors(verified.contents[ckpt.MODEL_FILE], folder / ckpt.MODEL_FILE)
    learner.model.load_state_dict({k: v.to(learner.device) for k, v in weights.items()})
    log.info("loadBestAtEnd: final model from checkpoint step %d", step)


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
    fencing.check("final/")  # a superseded leg commits no final model (volume.fencing)
    if layout.final_dir.exists():
        shutil.rmtree(layout.final_dir)
    os.replace(tmp, layout.final_dir)
    fsync_dir(layout.run_dir)
