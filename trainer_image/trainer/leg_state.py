"""The nouns one training leg passes between its parts: the plan, the learner, the running totals, the timings.

Built by train.py, advanced by loop.py, captured by checkpoint_policy.py; torch is only touched through the
objects the learner holds, so this module imports without it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

RECENT_LOSS_WINDOW = 50


@dataclass(frozen=True)
class Plan:
    """How the leg's data divides into optimizer steps; the same in every leg of a run."""

    total_steps: int
    steps_per_epoch: int
    micro_batches_per_epoch: int
    accumulation: int  # micro-batches per optimizer step (the last step of an epoch may have fewer)

    def epoch(self, step: int) -> int:
        """The epoch that optimizer step `step` (0-based: steps taken so far) belongs to."""
        return step // self.steps_per_epoch

    def first_micro_batch(self, step: int) -> int:
        """Index, within its epoch, of the first micro-batch of the step after `step` steps taken."""
        return (step % self.steps_per_epoch) * self.accumulation

    def micro_batches(self, step: int) -> range:
        """The micro-batches (indices within the epoch) of the step after `step` steps taken."""
        first = self.first_micro_batch(step)
        return range(first, min(first + self.accumulation, self.micro_batches_per_epoch))


@dataclass
class Learner:
    """The model and what updates it, on its device: what a step changes and a checkpoint holds."""

    model: Any
    optimizer: Any
    scheduler: Any
    device: Any  # torch.device
    bf16: bool

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on the learner's device, or nothing for fp32."""
        if not self.bf16:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @property
    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])


@dataclass
class Totals:
    """What the loop has accumulated since step 0; saved in every checkpoint and restored on resume."""

    step: int = 0
    loss_sum: float = 0.0
    samples_seen: int = 0
    recent_losses: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_LOSS_WINDOW))

    def restore(self, trainer_state: dict[str, Any]) -> None:
        """Take the totals a checkpoint's trainer_state.json holds (checkpoint_policy writes them)."""
        self.step = int(trainer_state["step"])
        self.loss_sum = float(trainer_state["loss_sum"])
        self.samples_seen = int(trainer_state["samples_seen"])
        self.recent_losses.clear()
        self.recent_losses.extend(float(x) for x in trainer_state["recent_losses"])

    def add_step(self, loss: float, samples: int) -> None:
        self.step += 1
        self.loss_sum += loss
        self.samples_seen += samples
        self.recent_losses.append(loss)

    @property
    def mean_recent_loss(self) -> float:
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else float("nan")


@dataclass
class LegStats:
    """Timings of one leg, for the benchmark and the final log line."""

    start_step: int = 0
    end_step: int = 0
    step_seconds: list[float] = field(default_factory=list)
    stall_seconds: list[float] = field(default_factory=list)  # training thread time per checkpoint
    checkpoint_bytes: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0  # of train_seconds, the evaluations during training (evalEverySteps)
    samples: int = 0
