"""A local leg that is alive but silent (issue 13): no progress.json change for retries.progressStallSeconds.

The local backend kills it and reports a preemption with reason ProgressStalled, so the workflow starts the
next leg; a leg whose progress keeps moving is left alone. The trainer is the stand-in of test_local_backend.py
(mode "run" writes no progress, mode "progress" rewrites progress.json every 0.1 s).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from controller.backends.local import LocalBackend
from controller.backends.local_leg import process_start_time
from controller.leg_model import LegOutcomeKind, LegSpec, LegState, classify_termination
from controller.spec import DatasetSpec, RetrySpec, TrainingRunSpec
from trainer.volume import read_json

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]
STALL_S = 1.5


def _backend(volume: Path, mode: str) -> LocalBackend:
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RELAY_STANDIN": mode}
    return LocalBackend(volume, extra_env=env, trainer_module="relay_testing.standin_local_trainer")


def _leg(n: int) -> LegSpec:
    spec = TrainingRunSpec(dataset=DatasetSpec(source="demo"), retries=RetrySpec(progress_stall_seconds=STALL_S))
    return LegSpec(namespace="default", name="r1", leg=n, run_path="runs/default/r1", snapshot_path="snapshots/x",
                   spec=spec)  # fmt: skip


async def test_a_silent_leg_is_killed_as_progress_stalled_and_the_next_leg_starts(tmp_path: Path) -> None:
    backend = _backend(tmp_path, "run")
    leg = _leg(0)
    await backend.launch(leg)
    started = time.monotonic()
    observation = await backend.observe(leg)
    while observation.state != LegState.TERMINATED:
        assert time.monotonic() - started < STALL_S + 10, f"never judged stalled: {observation}"
        observation = await backend.wait_for_change(leg, 0.2)
    waited = time.monotonic() - started
    termination = observation.termination
    assert termination is not None and termination.reason == "ProgressStalled"
    assert "no progress for" in termination.message and "progressStallSeconds 1.5" in termination.message
    assert classify_termination(termination) == LegOutcomeKind.PREEMPTED
    assert STALL_S - 0.5 <= waited <= STALL_S + 5
    trainer = read_json(tmp_path / "runs/default/r1/legs/0.trainer.json")
    time.sleep(0.2)
    assert process_start_time(trainer["pid"]) != trainer["start_time"], "the stalled trainer lives on"
    assert backend.alive_legs("default", "r1") == []
    # The next leg is not refused as a conflict: the stalled one is gone.
    replacement = await backend.launch(_leg(1))
    assert not replacement.adopted
    await backend.stop(_leg(1), grace_s=5)


async def test_a_leg_whose_progress_moves_is_left_running(tmp_path: Path) -> None:
    backend = _backend(tmp_path, "progress")
    leg = _leg(0)
    await backend.launch(leg)
    deadline = time.monotonic() + STALL_S * 2.5
    while time.monotonic() < deadline:
        observation = await backend.wait_for_change(leg, 0.2)
        assert observation.state in (LegState.PENDING, LegState.RUNNING), observation
    observation = await backend.stop(leg, grace_s=5)
    assert observation.termination is not None and observation.termination.exit_code == 75
