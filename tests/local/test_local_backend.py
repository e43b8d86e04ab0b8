"""LocalBackend with real processes: stop semantics, adoption by a new backend instance, one leg at a time.

The trainer is a stand-in (relay_testing/standin_local_trainer.py) with the trainer's arguments, exit codes and
signal handling, so these tests take seconds; the real trainer runs in test_local_e2e.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from controller.backends.local import LegConflict, LocalBackend
from controller.backends.local_leg import process_start_time
from controller.leg_model import LegOutcomeKind, LegSpec, LegState, classify_termination
from controller.spec import DatasetSpec, TrainingRunSpec
from trainer.volume import read_json

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]  # relay_testing, the stand-in trainer's package, lives here


def _backend(volume: Path, mode: str) -> LocalBackend:
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RELAY_STANDIN": mode}
    return LocalBackend(volume, extra_env=env, trainer_module="relay_testing.standin_local_trainer")


def _leg(n: int, name: str = "r1") -> LegSpec:
    return LegSpec(
        namespace="default",
        name=name,
        leg=n,
        run_path=f"runs/default/{name}",
        snapshot_path="snapshots/x",
        spec=TrainingRunSpec(dataset=DatasetSpec(source="demo")),
    )


async def _wait_running(backend: LocalBackend, leg: LegSpec) -> None:
    log = backend.volume_root / leg.run_path / "legs" / f"{leg.leg}.log"
    deadline = time.monotonic() + 15
    while "ready" not in (log.read_text() if log.exists() else "") or (
        (await backend.observe(leg)).state != LegState.RUNNING
    ):
        assert time.monotonic() < deadline, "leg did not start"
        time.sleep(0.05)


async def test_sigterm_stop_is_a_preemption_with_the_trainers_code(tmp_path: Path):
    backend = _backend(tmp_path, "run")
    leg = _leg(0)
    handle = await backend.launch(leg)
    await _wait_running(backend, leg)
    assert handle.backend_id.startswith("pid:") and not handle.adopted
    observation = await backend.stop(leg, grace_s=10)
    assert observation.state == LegState.TERMINATED and observation.termination is not None
    assert observation.termination.exit_code == 75
    assert classify_termination(observation.termination) == LegOutcomeKind.PREEMPTED
    exit_record = read_json(tmp_path / "runs/default/r1/legs/0.exit.json")
    assert exit_record["signals_received"] == [signal.SIGTERM]


async def test_sigkill_after_grace_when_sigterm_is_ignored(tmp_path: Path):
    backend = _backend(tmp_path, "stubborn")
    leg = _leg(0)
    await backend.launch(leg)
    await _wait_running(backend, leg)
    trainer_pid = read_json(tmp_path / "runs/default/r1/legs/0.trainer.json")["pid"]
    started = time.monotonic()
    observation = await backend.stop(leg, grace_s=1.0)
    assert 1.0 <= time.monotonic() - started < 8
    assert observation.termination is not None and observation.termination.signal == signal.SIGKILL
    assert classify_termination(observation.termination) == LegOutcomeKind.PREEMPTED
    time.sleep(0.2)
    assert process_start_time(trainer_pid) is None  # the whole process group is gone


async def test_trainer_error_exit_is_a_failure_with_its_last_line(tmp_path: Path):
    backend = _backend(tmp_path, "exit:1")
    leg = _leg(0)
    await backend.launch(leg)
    observation = await backend.wait_for_change(leg, 15)
    while observation.state != LegState.TERMINATED:
        observation = await backend.wait_for_change(leg, 15)
    assert observation.termination is not None and observation.termination.exit_code == 1
    assert classify_termination(observation.termination) == LegOutcomeKind.FAILED
    assert "something the trainer could not handle" in observation.termination.message


async def test_new_backend_adopts_a_running_leg_and_refuses_a_second(tmp_path: Path):
    first = _backend(tmp_path, "run")
    leg0 = _leg(0)
    handle = await first.launch(leg0)
    await _wait_running(first, leg0)
    # A restarted worker: a new backend over the same volume, no child process handles.
    second = _backend(tmp_path, "run")
    adopted = await second.launch(leg0)
    assert adopted.adopted and adopted.backend_id == handle.backend_id
    assert (await second.observe(leg0)).state == LegState.RUNNING
    with pytest.raises(LegConflict, match="leg 0 is still running"):
        await second.launch(_leg(1))
    assert not (tmp_path / "runs/default/r1/legs/1.pid.json").exists()
    observation = await second.stop(leg0, grace_s=10)  # it can stop a process it did not start
    assert observation.termination is not None and observation.termination.exit_code == 75
    await second.launch(_leg(1))  # once leg 0 ended, leg 1 may start
    await _wait_running(second, _leg(1))
    await second.cleanup("default", "r1")
    assert (await second.observe(_leg(1))).state == LegState.TERMINATED


async def test_vanished_supervisor_means_lost_leg_and_orphan_killed(tmp_path: Path):
    backend = _backend(tmp_path, "run")
    leg = _leg(0)
    await backend.launch(leg)
    await _wait_running(backend, leg)
    supervisor = read_json(tmp_path / "runs/default/r1/legs/0.pid.json")["pid"]
    trainer_pid = read_json(tmp_path / "runs/default/r1/legs/0.trainer.json")["pid"]
    os.kill(supervisor, signal.SIGKILL)  # only the supervisor: the trainer is orphaned
    time.sleep(0.3)
    observation = await backend.observe(leg)
    assert observation.state == LegState.TERMINATED and observation.termination is not None
    assert observation.termination.reason == "Lost"
    assert classify_termination(observation.termination) == LegOutcomeKind.PREEMPTED
    time.sleep(0.2)
    assert process_start_time(trainer_pid) is None


async def test_unknown_leg_is_missing(tmp_path: Path):
    backend = _backend(tmp_path, "run")
    assert (await backend.observe(_leg(3))).state == LegState.MISSING
    assert (await backend.stop(_leg(3), 1)).state == LegState.MISSING
