"""The checkpoint line's cost to training (checkpoint_policy.WriteOverlap): the training thread's wait plus how
much slower the steps that overlapped the write ran than the leg's other steps, not the wait alone."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from trainer_helpers import write_config

from trainer.checkpoint_policy import WriteOverlap
from trainer.faults import Faults
from trainer.train import run_leg
from trainer.volume import ExitCode


def test_steps_overlapping_a_write_are_measured_against_the_steps_without_one() -> None:
    overlap = WriteOverlap()
    for seconds in (0.10, 0.11, 0.09, 0.10):
        overlap.step(seconds)
    overlap.started()
    overlap.step(0.30)  # 0.05 s of it waiting for the copy: already counted as the stall
    overlap.waited += 0.05
    overlap.step(0.15)
    overlap.step(0.12)
    extra, steps = overlap.finished() or (None, None)
    assert steps == 3
    assert extra == pytest.approx((0.30 - 0.10) + (0.15 - 0.10) + (0.12 - 0.10) - 0.05)
    overlap.step(0.10)
    assert list(overlap.quiet_steps)[-1] == 0.10, "after the write, steps count as quiet again"


def test_a_write_before_any_quiet_step_has_no_figure() -> None:
    overlap = WriteOverlap()
    overlap.started()
    overlap.step(0.2)
    assert overlap.finished() is None


def test_the_checkpoint_line_gives_the_cost_to_training(
    snapshot: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path / "config.json", maxSteps=12, checkpointEverySteps=4)
    with caplog.at_level(logging.INFO, logger="trainer"):
        result = run_leg(tmp_path / "run", snapshot, config, faults=Faults(), install_signals=False)
    assert result.exit_code == ExitCode.COMPLETE, result.message
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint step-")]
    pattern = r"cost to training \S+: stalled \S+ \+ [+-]\d+\.\d+s over the \d+ step\(s\) that overlapped the write"
    off_thread = [line for line in lines if re.search(pattern, line)]
    assert off_thread, lines  # steps 4 and 8 were written off-thread; 12, the last, synchronously
