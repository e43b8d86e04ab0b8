"""Checkpoint policy: when a step is checkpointed, what a checkpoint captures, and what the training thread pays.

A due checkpoint is captured on the training thread (the state copied into reused host buffers; parameters and
optimizer moments are copied by the writer thread while the next forward/backward only read them) and written
off-thread by checkpoint.AsyncCheckpointWriter, at most one write in flight. The training thread's wait, the
stall, is the capture plus any wait for the previous write or for the copy before the next optimizer.step();
it is kept per checkpoint in LegStats.stall_seconds. It is not the whole cost: the write's copy, sha256 and
file writes compete with the steps for the cores (on 2 cores with 2 torch threads, the ~10 steps after a
MiniLM checkpoint ran slower). So the checkpoint line logs the slowdown too (WriteOverlap): the steps that
overlapped the write, against the median of the leg's recent steps that did not. The last step of a run and
the step a SIGTERM stops at are always saved (synchronously) before the leg goes on or exits.

Evaluation during training (issue 15): a checkpoint of an evaluated step carries its eval metrics in the
manifest, and every checkpoint's trainer_state.json carries the EvalTracker (the last and the best evaluation,
the patience used), so a resumed leg goes on with the same record. With metricForBest every evaluated step is
also checkpointed, so the best is a checkpoint one can load, and retention keeps the best by that metric
besides the last keepLast (the newest always); without it the interval's training loss ranks them, as before.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.distributed import World
from trainer.evaluation import EvalTracker
from trainer.leg_state import Learner, LegStats, Plan, Totals
from trainer.optimizer import implementation_of
from trainer.reporting import Reporter
from trainer.volume import CheckpointInfo, RunLayout, checkpoint_dir_name
from trainer.volume.manifests import MANIFEST_NAME, add_manifest_metrics

DATA_ORDER = "trainer.data.epoch_batches(lengths, batch_size, seed, epoch), generator seed*1000003+epoch"
# trainer_state.json fields also kept in the manifest's `extra`, so a reader need not open the state file.
MANIFEST_EXTRA_FIELDS = (
    "batch_in_epoch",
    "total_steps",
    "steps_per_epoch",
    "torch_threads",
    "snapshot_sha256",
    "samples_seen",
    "device",
    "optimizer",
    "world_size",
    "global_micro_batches",
    "dropout_rng",
)


@dataclass(frozen=True)
class RunFacts:
    """What every checkpoint of the run records about its inputs and build, besides the config."""

    train_rows: int
    snapshot_sha256: str
    torch_version: str


# The baseline for WriteOverlap: the median of this many recent steps without a write in flight.
QUIET_STEPS = 50


@dataclass
class WriteOverlap:
    """How much slower the steps that overlapped a checkpoint's write ran than the leg's other steps."""

    quiet_steps: deque[float] = field(default_factory=lambda: deque(maxlen=QUIET_STEPS))  # no write in flight
    overlapping: list[float] = field(default_factory=list)  # step times while the current write was in flight
    waited: float = 0.0  # the part of those step times already counted as stall (waiting for the copy)
    writing: bool = False

    def step(self, seconds: float) -> None:
        (self.overlapping if self.writing else self.quiet_steps).append(seconds)

    def started(self) -> None:
        self.writing, self.overlapping, self.waited = True, [], 0.0

    def finished(self) -> tuple[float, int] | None:
        """(extra seconds the overlapping steps took beyond their waits, how many there were); None without
        steps to compare to."""
        self.writing = False
        if not self.quiet_steps:
            return None
        usual = statistics.median(self.quiet_steps)
        return sum(seconds - usual for seconds in self.overlapping) - self.waited, len(self.overlapping)


class CheckpointPolicy:
    """Decides and takes the leg's checkpoints; owns the writer thread (close it when the leg ends)."""

    def __init__(
        self,
        *,
        layout: RunLayout,
        config: TrainerConfig,
        plan: Plan,
        learner: Learner,
        totals: Totals,
        facts: RunFacts,
        last_saved_step: int | None,
        reporter: Reporter,
        stats: LegStats,
        tracker: EvalTracker | None = None,
        world: World | None = None,
        dropout_rng: str | None = None,
    ) -> None:
        self.config = config
        self.world = world or World()
        self.dropout_rng = dropout_rng  # trainer_state "dropout_rng": MICRO_BATCH_DROPOUT, or None (one stream)
        self.layout = layout
        self.tracker = tracker if tracker is not None else eval_tracker(config)
        self.plan = plan
        self.learner = learner
        self.totals = totals
        self.facts = facts
        self.reporter = reporter
        self.stats = stats
        self.last_saved_step = last_saved_step if last_saved_step is not None else -1
        self.writer = ckpt.AsyncCheckpointWriter(
            layout.checkpoints_dir,
            config.keep_last,
            config.metric_for_best or ckpt.RETENTION_METRIC,  # retention's "the best": the manifest's loss unless set
            config.higher_is_better if config.metric_for_best is not None else False,
            direct_writes=config.checkpoint_direct_writes,
        )
        self._config_json = config.to_json_text()
        self._identity = config.identity_hash()
        self._last_checkpoint_time = time.monotonic()
        self.overlap = WriteOverlap()

    # ---------------------------------------------------------------- what a checkpoint holds

    def trainer_state(self, step: int) -> dict[str, Any]:
        """trainer_state.json: the data position after `step` steps, the totals, and the run's fixed facts."""
        plan = self.plan
        return {
            "step": step,
            "epoch": plan.epoch(step),
            "batch_in_epoch": plan.first_micro_batch(step),
            "total_steps": plan.total_steps,
            "steps_per_epoch": plan.steps_per_epoch,
            "micro_batches_per_epoch": plan.micro_batches_per_epoch,
            "data_order": DATA_ORDER,
            "seed": self.config.seed,
            "train_rows": self.facts.train_rows,
            "loss_sum": self.totals.loss_sum,
            "samples_seen": self.totals.samples_seen,
            "recent_losses": list(self.totals.recent_losses),
            "torch_threads": self.config.torch_threads,
            "device": self.learner.device.type,
            "precision": self.learner.precision,
            "optimizer": implementation_of(self.learner.optimizer.param_groups),  # informative: resume reads the groups
            "snapshot_sha256": self.facts.snapshot_sha256,
            "torch_version": self.facts.torch_version,
            "evaluation": self.tracker.to_state(),
            "world_size": self.world.size,
            "global_micro_batches": plan.accumulation,
        } | ({"dropout_rng": self.dropout_rng} if self.dropout_rng else {})

    def capture(self, step: int, *, emergency: bool = False) -> ckpt.HostState:
        """The state after `step` steps, taken into host memory (the deferred tensor copies finish on the
        writer thread before the next optimizer.step(); see before_optimizer_step)."""
        state = self.trainer_state(step)
        learner = self.learner
        rngs = self.world.gather_to_main(ckpt.capture_rng())  # every rank's, taken at the same step boundary
        host = ckpt.capture(
            model=learner.model,
            optimizer=learner.optimizer,
            scheduler=learner.scheduler,
            trainer_state=state,
            config_json=self._config_json,
            config_hash=self._identity,
            metrics={
                "loss": self.totals.mean_recent_loss,
                "train_loss": self.totals.loss_sum / step if step else float("nan"),
                "learning_rate": learner.learning_rate,
            }
            | self.tracker.metrics_at(step),
            extra={key: state[key] for key in MANIFEST_EXTRA_FIELDS if key in state} | {"emergency": emergency},
            buffers=self.writer.buffers,
            rng=rngs[0],
        )
        host.rank_rngs = rngs[1:]
        return host

    # ---------------------------------------------------------------- during the loop

    def before_optimizer_step(self) -> None:
        """Wait for a checkpoint's copy of the weights to finish before they change; the wait counts as that
        checkpoint's stall."""
        waited = self.writer.wait_copied()
        self.overlap.waited += waited
        if waited and self.stats.stall_seconds:
            self.stats.stall_seconds[-1] += waited
            if self.last_saved_step in self.reporter.stalls:
                self.reporter.stalls[self.last_saved_step] = self.stats.stall_seconds[-1]

    def poll(self) -> None:
        """After each step (its time in LegStats.step_seconds): report a write that finished since the last call."""
        if self.stats.step_seconds:
            self.overlap.step(self.stats.step_seconds[-1])
        self._note_saved(self.writer.poll())

    def due(self, step: int) -> bool:
        """Whether the state after `step` steps is checkpointed now (by step count, by elapsed time, or as an
        evaluated step when metricForBest ranks them; the last step is saved by save_last instead)."""
        every_steps, every_seconds = self.config.checkpoint_every_steps, self.config.checkpoint_every_seconds
        due = (
            (every_steps is not None and step % every_steps == 0)
            or (every_seconds is not None and time.monotonic() - self._last_checkpoint_time >= every_seconds)
            or (self.config.metric_for_best is not None and self.tracker.due(step, self.plan.total_steps))
        )
        return due and step < self.plan.total_steps

    def checkpoint(self, step: int) -> None:
        """Capture the state after `step` steps and hand it to the writer thread; records the stall."""
        if not self.world.is_main:  # rank 0 writes; this rank only hands over its RNG states
            self.world.gather_to_main(ckpt.capture_rng())
            self.last_saved_step = step
            return
        stall_started = time.perf_counter()
        self._note_saved(self.writer.wait())  # at most one write in flight
        self.writer.submit(self.capture(step))  # the state is copied here; the files are written off-thread
        self.overlap.started()
        stall = time.perf_counter() - stall_started
        self.stats.stall_seconds.append(stall)
        self.reporter.stalls[step] = stall
        self._last_checkpoint_time = time.monotonic()
        self.last_saved_step = step

    def evaluated_after_saving(self, step: int) -> None:
        """The evaluation of `step` finished after checkpoint `step` was saved without it (the leg before was
        stopped during it): that checkpoint's manifest gets the metrics, as if saved after the evaluation."""
        folder = self.layout.checkpoints_dir / checkpoint_dir_name(step)
        metrics = self.tracker.metrics_at(step)
        if metrics and (folder / MANIFEST_NAME).is_file():
            add_manifest_metrics(folder, metrics)

    # ---------------------------------------------------------------- at the end of the leg

    def save_last(self, step: int) -> None:
        """Training complete: wait for the write in flight, save the last step unless it is saved, close the
        writer. A preemption during evaluation or the final save then resumes straight into evaluation."""
        if not self.world.is_main:
            self._close_as_follower(step)
            return
        self._note_saved(self.writer.wait())
        if self.last_saved_step != step:
            self.reporter.update(state="checkpointing")
            self._note_saved(self.writer.save_now(self.capture(step)))
        self.writer.close()

    def _close_as_follower(self, step: int) -> None:
        """A rank other than 0 at the leg's end: hand its RNG state to rank 0 for a save of `step` it has not yet
        taken part in (rank 0 gathers it into that checkpoint), then close its writer."""
        if self.last_saved_step != step:
            self.world.gather_to_main(ckpt.capture_rng())
            self.last_saved_step = step
        self.writer.close()

    def emergency_save(self, step: int) -> None:
        """Stop requested: wait for the write in flight, save `step` (marked emergency) unless it is saved,
        close the writer."""
        if not self.world.is_main:
            self._close_as_follower(step)
            return
        self._note_saved(self.writer.wait())
        if self.last_saved_step != step:
            self._note_saved(self.writer.save_now(self.capture(step, emergency=True)))
        self.writer.close()

    def close(self) -> None:
        """Wait for any write in flight and stop the writer thread (again harmless)."""
        self.writer.close()

    def _note_saved(self, info: CheckpointInfo | None) -> None:
        if info is None:
            return
        self.stats.checkpoint_bytes = info.total_bytes
        slowdown = self.overlap.finished() if self.overlap.writing else None
        self.reporter.checkpoint_saved(info, slowdown=slowdown)


def eval_tracker(config: TrainerConfig) -> EvalTracker:
    """The run's evaluation record as its config asks for (no evaluations without evalEverySteps)."""
    return EvalTracker(
        every_steps=config.eval_every_steps,
        metric=config.metric_for_best,
        higher_is_better=config.higher_is_better,
        patience=config.early_stopping_patience,
    )
