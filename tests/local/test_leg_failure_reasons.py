"""Why a local leg failed, as a user reads it: the trainer's termination message (not the last log line) in the
leg's exit record and the run's status, and a full volume recorded as a failure naming ENOSPC (not a lost leg).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.testing import WorkflowEnvironment

from controller.backends.local import LocalBackend
from controller.leg_model import LegOutcomeKind, LegSpec, LegState, classify_termination
from controller.spec import DatasetSpec, TrainingRunSpec, parse_training_run, workflow_id
from controller.status import Phase, RunStatus
from controller.worker import build_worker
from controller.workflows import CheckpointedBertTrainingWorkflow, TrainingRunInput
from trainer.volume import RunLayout, read_json, read_progress

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]  # relay_testing, the stand-in trainer's package, lives here


async def test_the_trainers_termination_message_is_the_legs_reason(tmp_path: Path) -> None:
    """The stand-in fails like the trainer: a traceback whose last line is a source line, and its reason."""
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RELAY_STANDIN": "raise"}
    backend = LocalBackend(tmp_path, extra_env=env, trainer_module="relay_testing.standin_local_trainer")
    leg = LegSpec(
        namespace="default",
        name="r1",
        leg=0,
        run_path="runs/default/r1",
        snapshot_path="snapshots/x",
        spec=TrainingRunSpec(dataset=DatasetSpec(source="demo")),
    )
    await backend.launch(leg)
    observation = await backend.wait_for_change(leg, timeout_s=30)
    assert observation.state == LegState.TERMINATED and observation.termination is not None
    assert observation.termination.exit_code == 1
    assert observation.termination.message == "ValueError: warmup needs at least 1 step, got 0"
    assert classify_termination(observation.termination) == LegOutcomeKind.FAILED
    log = (tmp_path / "runs/default/r1/legs/0.log").read_text()
    assert log.rstrip().endswith("schedule = build_schedule(steps)")  # what the reason used to be


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: a volume that can really be filled."""
    volume = tmp_path / "volume"
    volume.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(volume)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full volume needs a tmpfs mount (root): {mounted.stderr.decode().strip()}")
    try:
        yield volume
    finally:
        subprocess.run(["umount", "--lazy", str(volume)], check=False)


def grab_free_space(handle: int, size: int) -> int:
    """Allocate whatever the volume has left to the filler (page by page at the end); returns its new size."""
    chunk = 1 << 20
    while chunk >= 4096:
        try:
            os.posix_fallocate(handle, size, chunk)
            size += chunk
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            chunk //= 2
    return size


@pytest.mark.slow
async def test_a_leg_that_fills_the_volume_is_failed_with_enospc_not_lost(
    temporal_env: WorkflowEnvironment, task_queue: str, small_volume: Path
) -> None:
    """The real trainer on a volume filled to the last byte while it trains: its write fails, it exits 1, and
    the supervisor still records the exit (in space reserved at launch), so the run says why."""
    name = f"full-{uuid.uuid4().hex[:6]}"
    document = {
        "apiVersion": "relay.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "model": "tiny",
            "dataset": {"source": "demo", "maxRows": 200, "evalFraction": 0.25},
            "training": {"maxSteps": 5000, "batchSize": 8, "maxSeqLength": 32, "logEverySteps": 1},
            "resources": {"cpu": "1"},
            "retries": {"maxFailures": 0, "backoffSeconds": 0},
        },
    }
    run_input = TrainingRunInput(
        namespace="default",
        name=name,
        spec=parse_training_run(document).spec,
        await_window_s=1.0,
        poll_interval_s=0.05,
        heartbeat_timeout_s=3.0,
    )
    layout = RunLayout.for_run(small_volume, "default", name)
    exit_record = layout.legs_dir / "0.exit.json"
    async with build_worker(temporal_env.client, LocalBackend(small_volume), small_volume, task_queue=task_queue):
        handle = await temporal_env.client.start_workflow(
            CheckpointedBertTrainingWorkflow.run,
            run_input,
            id=workflow_id("default", name),
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        deadline = time.monotonic() + 120
        while (read_progress(layout) or {}).get("step", 0) < 1:
            assert time.monotonic() < deadline, "leg 0 did not start training"
            await asyncio.sleep(0.05)
        filler = small_volume / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            size = grab_free_space(fd, 0)
            assert shutil.disk_usage(small_volume).free == 0
            while not exit_record.exists():  # keep it full: take each page the trainer's renames give back
                assert time.monotonic() < deadline, "leg 0 did not end on the full volume"
                size = grab_free_space(fd, size)
                await asyncio.sleep(0.005)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                filler.unlink()  # the workflow records the leg's end on the volume afterwards
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 120)
        status: RunStatus = await handle.query(CheckpointedBertTrainingWorkflow.get_status)
    record = read_json(exit_record)
    assert record["exit_code"] == 1, record
    assert record["message"].startswith("OSError: [Errno 28] No space left on device"), record
    assert status.phase == Phase.FAILED
    assert [leg.outcome for leg in status.legs] == ["failed"]
    assert "exit 1 (FAILED)" in status.legs[0].reason
    assert "OSError: [Errno 28] No space left on device" in status.legs[0].reason
    assert "OSError: [Errno 28] No space left on device" in status.message and "maxFailures" in status.message
