"""Activities in temporalio's ActivityEnvironment: bad input becomes non-retryable, await_leg resumes from its
heartbeat (an injected preemption is sent once), evaluate trusts only a verified final model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from controller.activities import RelayActivities, read_leg_progress
from controller.leg_model import LegHandle, LegObservation, LegOutcomeKind, LegSpec, LegState, LegTermination
from controller.messages import (
    AwaitHeartbeat,
    AwaitLegRequest,
    LaunchLegRequest,
    LegProgress,
    PrepareRunRequest,
    RunRef,
    SnapshotRequest,
    SnapshotResult,
)
from controller.spec import DatasetSpec, TrainingRunSpec, trainer_config
from trainer.config import TrainerConfig, TrainingSettings
from trainer.volume import RunLayout, atomic_write_json, checkpoint_dir_name, write_manifest, write_progress

pytestmark = pytest.mark.anyio


class RunningLeg:
    """A backend below the activity under test: one leg that runs until stopped, then exits 75."""

    def __init__(self) -> None:
        self.stops = 0

    async def launch(self, leg: LegSpec) -> LegHandle:
        return LegHandle(leg=leg.leg, backend_id="fake", started_at=0.0)

    async def observe(self, leg: LegSpec) -> LegObservation:
        if self.stops:
            return LegObservation(state=LegState.TERMINATED, termination=LegTermination(exit_code=75))
        return LegObservation(state=LegState.RUNNING)

    async def wait_for_change(self, leg: LegSpec, timeout_s: float) -> LegObservation:
        return await self.observe(leg)

    async def stop(self, leg: LegSpec, grace_s: float) -> LegObservation:
        self.stops += 1
        return await self.observe(leg)

    async def cleanup(self, namespace: str, name: str) -> None:
        return None


def _leg() -> LegSpec:
    spec = TrainingRunSpec(dataset=DatasetSpec(source="demo"))
    return LegSpec(namespace="default", name="r", leg=0, run_path="runs/default/r", snapshot_path="s", spec=spec)


def _checkpoint(volume: Path, step: int) -> None:
    folder = RunLayout.for_run(volume, "default", "r").checkpoints_dir / checkpoint_dir_name(step)
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"w" * 64)
    write_manifest(folder, step=step, epoch=0, config_hash="h", metrics={"loss": 0.5})


async def test_await_leg_injects_a_preemption_once_and_reports_progress(tmp_path: Path):
    backend = RunningLeg()
    activities = RelayActivities(backend, tmp_path)
    _checkpoint(tmp_path, 40)
    write_progress(RunLayout.for_run(tmp_path, "default", "r"), {"step": 44, "total_steps": 100, "samples_per_s": 9.5})
    beats: list[AwaitHeartbeat] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details[0])
    request = AwaitLegRequest(leg=_leg(), preempt_at_steps=[42, 90], max_wait_s=5, poll_interval_s=0.01)
    result = await env.run(activities.await_leg, request)
    assert result.terminated and result.outcome == LegOutcomeKind.PREEMPTED and result.injected_preempt_at == 42
    assert backend.stops == 1
    assert result.progress.step == 44 and result.progress.total_steps == 100
    assert result.progress.samples_per_second == 9.5
    assert result.progress.latest_checkpoint is not None and result.progress.latest_checkpoint.step == 40
    assert result.progress.latest_checkpoint.loss == 0.5
    assert beats and beats[-1].injected_preempt_at == 42

    # A retried attempt (worker restarted) continues from its heartbeat: no second SIGTERM.
    backend.stops = 0
    retry = ActivityEnvironment()
    detail = AwaitHeartbeat(progress=LegProgress(step=44), injected_preempt_at=42).model_dump()
    retry.info = dataclasses.replace(retry.info, heartbeat_details=[detail], attempt=2)
    still_running = await retry.run(activities.await_leg, request.model_copy(update={"max_wait_s": 0.1}))
    assert not still_running.terminated and backend.stops == 0 and still_running.injected_preempt_at == 42


def test_leg_progress_reads_the_typed_progress_record(tmp_path: Path):
    """progress.json through trainer.volume's typed reader: a file of an older trainer (its spellings
    samples_per_second / eta_seconds) reads the same; without one, the newest checkpoint gives the step."""
    layout = RunLayout.for_run(tmp_path, "default", "r")
    _checkpoint(tmp_path, 40)
    assert read_leg_progress(tmp_path, "default", "r").step == 40
    assert read_leg_progress(tmp_path, "default", "r").samples_per_second is None
    old = {"step": 47, "total_steps": 100, "epoch": 1, "loss": 0.25, "samples_per_second": 9.5, "eta_seconds": 31.0}
    atomic_write_json(layout.progress_path, old)
    progress = read_leg_progress(tmp_path, "default", "r")
    assert (progress.step, progress.total_steps, progress.epoch, progress.loss) == (47, 100, 1, 0.25)
    assert (progress.samples_per_second, progress.eta_seconds) == (9.5, 31.0)
    write_progress(layout, {"step": 12, "samples_per_s": 8.0, "eta_s": 5.0})  # behind the checkpoint (a resume)
    progress = read_leg_progress(tmp_path, "default", "r")
    assert (progress.step, progress.samples_per_second, progress.eta_seconds) == (40, 8.0, 5.0)


async def test_launch_records_the_step_the_trainer_will_really_resume_from(tmp_path: Path):
    """A newer checkpoint that fails its hashes is not the resume point (the trainer will quarantine it)."""
    activities = RelayActivities(RunningLeg(), tmp_path)
    _checkpoint(tmp_path, 70)
    _checkpoint(tmp_path, 80)
    layout = RunLayout.for_run(tmp_path, "default", "r")
    (layout.checkpoints_dir / checkpoint_dir_name(80) / "weights.bin").write_bytes(b"x" * 64)  # same size, corrupt
    launched = await ActivityEnvironment().run(activities.launch_leg, LaunchLegRequest(leg=_leg()))
    assert launched.start_step == 70
    record = json.loads(layout.leg_record_path(0).read_text())
    assert record["startStep"] == 70
    assert (layout.checkpoints_dir / checkpoint_dir_name(80)).is_dir(), "the controller moves nothing"


async def test_snapshot_activity_turns_bad_data_into_a_non_retryable_error(tmp_path: Path):
    activities = RelayActivities(RunningLeg(), tmp_path)
    request = SnapshotRequest(
        namespace="default", name="r", dataset=DatasetSpec(source="csv", path="x.csv"), num_labels=2
    )
    with pytest.raises(ApplicationError) as info:
        await ActivityEnvironment().run(activities.snapshot_dataset, request)
    assert info.value.non_retryable and info.value.type == "InvalidDataset"
    assert info.value.message == f"dataset.path 'x.csv': no such file under the volume {tmp_path.resolve()}"


async def test_prepare_run_writes_the_config_every_leg_reads(tmp_path: Path):
    activities = RelayActivities(RunningLeg(), tmp_path)
    spec = TrainingRunSpec(
        dataset=DatasetSpec(source="demo"),
        training=TrainingSettings(epochs=2, batch_size=10, gradient_accumulation_steps=3),
    )
    snapshot = SnapshotResult(sha256="a", path="snapshots/a", rows={"train": 95, "eval": 5}, fields=[], reused=False)
    result = await ActivityEnvironment().run(
        activities.prepare_run, PrepareRunRequest(namespace="default", name="r", spec=spec, snapshot=snapshot)
    )
    assert result.run_path == "runs/default/r" and result.config_path == "runs/default/r/config.json"
    assert result.total_steps == 2 * 4  # ceil(95 / 10) = 10 micro-batches -> ceil(10 / 3) = 4 steps per epoch
    written = TrainerConfig.load(tmp_path / result.config_path)
    assert written == trainer_config(spec) and result.next_leg == 0
    # A later workflow of the same run (re-run after it ended) numbers its legs after the recorded ones.
    atomic_write_json(tmp_path / "runs/default/r/legs/3.json", {"leg": 3})
    again = await ActivityEnvironment().run(
        activities.prepare_run, PrepareRunRequest(namespace="default", name="r", spec=spec, snapshot=snapshot)
    )
    assert again.next_leg == 4


async def test_evaluate_needs_a_verified_final_model(tmp_path: Path):
    activities = RelayActivities(RunningLeg(), tmp_path)
    ref = RunRef(namespace="default", name="r")
    with pytest.raises(ApplicationError, match=r"final model: .*manifest\.json: missing") as info:
        await ActivityEnvironment().run(activities.evaluate, ref)
    assert info.value.non_retryable
    final = RunLayout.for_run(tmp_path, "default", "r").final_dir
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"m" * 128)
    atomic_write_json(final / "metrics.json", {"accuracy": 0.8125, "eval_rows": 16, "note": "text is ignored"})
    write_manifest(final, step=10, epoch=1, config_hash="h")
    result = await ActivityEnvironment().run(activities.evaluate, ref)
    assert result.metrics == {"accuracy": 0.8125, "eval_rows": 16.0}
    assert result.model_path == "runs/default/r/final"
    (final / "model.safetensors").write_bytes(b"x" * 128)  # same size, corrupted
    with pytest.raises(ApplicationError, match="xxh3_128 does not match"):
        await ActivityEnvironment().run(activities.evaluate, ref)
    assert json.loads((final / "metrics.json").read_text())["accuracy"] == 0.8125
