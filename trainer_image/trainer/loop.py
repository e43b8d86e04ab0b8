"""The training loop of one leg: optimizer steps with gradient accumulation, then the end of training (the last
step checkpointed, evaluation, the final model written).

Nothing here draws from the global RNGs except the model's forward pass (dropout): the data order is derived
from (seed, epoch) with a private generator (data.epoch_batches), so a resumed leg continues the same streams.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from trainer import data as data_mod
from trainer.checkpoint_policy import CheckpointPolicy
from trainer.config import TrainerConfig
from trainer.errors import Preempted
from trainer.evaluation import evaluate
from trainer.faults import Faults
from trainer.leg_state import Learner, LegStats, Plan, Totals
from trainer.preemption import StopRequest
from trainer.reporting import Reporter
from trainer.volume import TMP_PREFIX, ExitCode, RunLayout, atomic_write_json, fencing, fsync_dir, write_manifest

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
        if self.stop.requested:
            raise Preempted(f"{self.stop.signal_name} during start-up; no step taken in this leg, none lost")
        while totals.step < plan.total_steps and not self.stop.requested:
            step_started = time.perf_counter()
            epoch = plan.epoch(totals.step)
            if epoch != order_epoch:
                batches = data_mod.epoch_batches(lengths, config.batch_size, config.seed, epoch)
                order_epoch = epoch
            micro_batches = plan.micro_batches(totals.step)
            step_loss = 0.0
            step_samples = 0
            for index, micro in enumerate(micro_batches):
                indices = batches[micro]
                batch = {
                    k: v.to(self.learner.device, non_blocking=True)
                    for k, v in data_mod.collate(train_data, indices).items()
                }
                with self.learner.autocast():
                    outputs = model(**batch)
                loss = outputs.loss / len(micro_batches)
                loss.backward()
                step_loss += float(loss.item())
                step_samples += len(indices)
                self.faults.during_step(totals.step + 1, index)
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
            if self.stop.requested:
                break
            if self.policy.due(totals.step):
                self.policy.checkpoint(totals.step)
        stats.end_step = totals.step
        stats.train_seconds = time.perf_counter() - leg_started

    def complete(self, layout: RunLayout, tokenizer: Any) -> tuple[ExitCode, str]:
        """Training done: the last step is checkpointed before evaluation, so a preemption during evaluation or
        the final save resumes straight into evaluation; then evaluate and write final/."""
        plan, totals, reporter, eval_data = self.plan, self.totals, self.reporter, self.eval_data
        total_steps = plan.total_steps
        self.policy.save_last(totals.step)
        if self.stop.requested:
            raise Preempted(f"{self.stop.signal_name} after the last step; checkpoint step {totals.step} holds it")
        reporter.update(state="evaluating", message="evaluating on the eval split")
        log.info("evaluating on %d eval rows", eval_data.rows)
        eval_metrics = evaluate(self.learner, eval_data, self.config.eval_batch_size, self.stop, self.faults)
        reporter.history(
            step=total_steps,
            epoch=round(total_steps / plan.steps_per_epoch, 4),
            eval_loss=eval_metrics["loss"],
            eval_accuracy=eval_metrics["accuracy"],
        )
        metrics = {
            **eval_metrics,
            "train_loss": totals.loss_sum / total_steps,
            "steps": total_steps,
            "epochs": total_steps / plan.steps_per_epoch,
            "train_rows": self.train_data.rows,
        }
        write_final(
            layout,
            self.learner.model,
            tokenizer,
            metrics,
            self.config.identity_hash(),
            total_steps,
            plan.epoch(total_steps - 1),
        )
        message = (
            f"complete: eval accuracy {metrics['accuracy']:.4f} f1_macro {metrics['f1_macro']:.4f} "
            f"loss {metrics['loss']:.4f} | train_loss {metrics['train_loss']:.4f} | final model at {layout.final_dir}"
        )
        log.info(message)
        reporter.update(state="completed", message=message, step=total_steps)
        return ExitCode.COMPLETE, message


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
