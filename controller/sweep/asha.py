"""Asynchronous successive halving (ASHA, Li et al. 2020) for a TrainingSweep. Pure, I/O-free.

Every trial trains for `maxSteps` (its learning-rate schedule is the full budget's, promoted or not) and stops
at each rung, `minSteps * reductionFactor**k` below `maxSteps`, where its eval metric is recorded. A trial
waiting at rung k is promoted (it continues from its checkpoint) when it is among the top
floor(n / reductionFactor) of the n trials that reached rung k so far, by the objective; promotions already
made count among the top. When nothing runs and no trial is left to start, the trials still waiting are
pruned. Ties go to the earlier trial; a NaN metric ranks last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Rungs:
    """The steps at which trials stop to be compared."""

    min_steps: int
    max_steps: int
    reduction_factor: int

    def __post_init__(self) -> None:
        if self.min_steps < 1:
            raise ValueError(f"minSteps: must be at least 1, not {self.min_steps}")
        if self.max_steps <= self.min_steps:
            raise ValueError(f"maxSteps: {self.max_steps} must be greater than minSteps {self.min_steps}")
        if self.reduction_factor < 2:
            raise ValueError(f"reductionFactor: must be at least 2, not {self.reduction_factor}")

    @property
    def steps(self) -> list[int]:
        """Rung steps in order: minSteps * rf**k for every k with a value below maxSteps."""
        steps, step = [], self.min_steps
        while step < self.max_steps:
            steps.append(step)
            step *= self.reduction_factor
        return steps

    def next_stop(self, step: int) -> int:
        """Where a trial at `step` stops next: the first rung above it, else maxSteps (the end)."""
        return next((rung for rung in self.steps if rung > step), self.max_steps)


def _sort_key(metric: float, order: int, maximize: bool) -> tuple[int, float, int]:
    if math.isnan(metric):
        return (1, 0.0, order)
    return (0, -metric if maximize else metric, order)


def ranked(results: Mapping[str, float], order: Mapping[str, int], maximize: bool) -> list[str]:
    """Trials best first by metric; ties by trial order; NaN last."""
    return sorted(results, key=lambda trial: _sort_key(results[trial], order[trial], maximize))


def promotions(
    rung_results: Mapping[int, Mapping[str, float]],
    waiting: Mapping[str, int],
    order: Mapping[str, int],
    reduction_factor: int,
    maximize: bool,
) -> list[str]:
    """Which waiting trials to promote now.

    rung_results[k][trial]: the metric of every trial that reached rung k (promoted, waiting or pruned since);
    waiting[trial]: the rung index a trial waits at; order[trial]: its trial number (ties, and the result's order).
    """
    promoted = []
    for trial, rung in waiting.items():
        results = rung_results.get(rung, {})
        top = ranked(results, order, maximize)[: len(results) // reduction_factor]
        if trial in top:
            promoted.append(trial)
    return sorted(promoted, key=lambda trial: order[trial])
