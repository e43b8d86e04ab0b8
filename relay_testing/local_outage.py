"""A local run through a Temporal outage: its own dev server (a database file), `relay worker` as a process, the
real trainer; the server stops once the leg has trained a little and comes back after `outage_s`.

tests/local/test_temporal_outage.py runs it with a short outage, bench/bench_ha.py with the issue's 60 s.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from controller.spec import parse_training_run, workflow_id
from controller.status import Phase, RunStatus
from controller.worker import connect
from controller.workflows import CheckpointedBertTrainingWorkflow, TrainingRunInput
from relay_testing.reference_training import file_sha256, train_uninterrupted
from relay_testing.temporal_outage import RestartableTemporal
from trainer.volume import HistoryEntry, RunLayout, list_checkpoint_dirs, load_progress


@dataclass(frozen=True)
class OutageResult:
    status: RunStatus
    step_at_stop: int
    step_at_restart: int
    checkpoints_during: list[int]
    unreachable_s: float
    catch_up_s: float
    worker_alive: bool
    pid_records: list[str]
    trainer_starts: int
    weights_equal: bool
    losses_differ_from: int | None = None  # the first step whose logged loss differs from the reference's


def logged_losses(history: Path) -> dict[int, float]:
    """Step -> training loss from a run's history.jsonl (the newest line per step)."""
    losses: dict[int, float] = {}
    for line in history.read_text().splitlines():
        entry = HistoryEntry.model_validate_json(line)
        if entry.event is None and entry.loss is not None:
            losses[entry.step] = entry.loss
    return losses


def run_document(steps: int) -> dict[str, object]:
    return {
        "apiVersion": "relay.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "outage"},
        "spec": {
            "model": "tiny",
            "dataset": {"source": "demo", "maxRows": 400, "evalFraction": 0.25},
            "training": {"maxSteps": steps, "batchSize": 8, "maxSeqLength": 32, "checkpointEverySteps": 25,
                         "logEverySteps": 1, "learningRate": 1e-3},
            "resources": {"cpu": "1"},
            "retries": {"backoffSeconds": 0},
            "terminationGracePeriodSeconds": 30,
        },
    }  # fmt: skip


async def run_through_outage(folder: Path, steps: int, outage_s: float, *, start_at_step: int = 30) -> OutageResult:
    """One run on its own server and worker: stop the server once the leg has checkpointed, wait, start it again.

    The worker's log is `folder/worker.log`."""
    volume_root, name, queue = folder / "volume", f"outage-{uuid.uuid4().hex[:6]}", f"tq-{uuid.uuid4()}"
    volume_root.mkdir(parents=True)
    layout = RunLayout.for_run(volume_root, "default", name)
    with RestartableTemporal(folder / "temporal") as server:
        command = [sys.executable, "-m", "controller.cli", "worker", "--address", server.address,
                   "--volume", str(volume_root), "--task-queue", queue]  # fmt: skip
        worker_log = (folder / "worker.log").open("wb")
        worker = subprocess.Popen(command, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            client = await connect(server.address)
            spec = parse_training_run(run_document(steps)).spec
            run_input = TrainingRunInput(namespace="default", name=name, spec=spec, await_window_s=1.0,
                                         poll_interval_s=0.05, heartbeat_timeout_s=3.0)  # fmt: skip
            handle = await client.start_workflow(
                CheckpointedBertTrainingWorkflow.run, run_input, id=workflow_id("default", name), task_queue=queue
            )
            deadline = time.monotonic() + 120
            while (progress := load_progress(layout)) is None or progress.step < start_at_step:
                assert worker.poll() is None, f"the worker exited: {(folder / 'worker.log').read_text()[-3000:]}"
                assert time.monotonic() < deadline, (
                    f"the leg did not reach step {start_at_step}: progress {progress}\n"
                    f"worker: {(folder / 'worker.log').read_text()[-3000:]}\nserver: {server.log_tail()}"
                )
                await asyncio.sleep(0.1)
            before = {step for step, _ in list_checkpoint_dirs(layout.checkpoints_dir)}
            step_at_stop = progress.step
            down_at = time.monotonic()
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(max(0.0, outage_s - (time.monotonic() - down_at)))
            reloaded = load_progress(layout)
            step_at_restart = reloaded.step if reloaded else 0
            during = sorted({step for step, _ in list_checkpoint_dirs(layout.checkpoints_dir)} - before)
            worker_alive = worker.poll() is None
            await asyncio.to_thread(server.start)
            unreachable_s = time.monotonic() - down_at
            status: RunStatus = await asyncio.wait_for(handle.result(), 180)
            catch_up_s = time.monotonic() - down_at - unreachable_s
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT)
                try:
                    worker.wait(20)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
            worker_log.close()
    pid_records = sorted(p.name for p in (layout.run_dir / "legs").glob("*.pid.json"))
    starts = sum(1 for line in layout.history_path.read_text().splitlines() if '"event": "start"' in line)
    equal, differ_from = False, None
    if status.phase == Phase.SUCCEEDED and status.snapshot is not None:
        reference = train_uninterrupted(
            volume_root, status.snapshot.path, layout.config_path, volume_root / "runs/default/reference"
        )
        equal = file_sha256(layout.run_dir / "final/model.safetensors") == file_sha256(reference)
        if not equal:  # before step_at_stop: not the outage's doing (the trainer's inputs or code differed)
            ours, theirs = logged_losses(layout.history_path), logged_losses(reference.parents[1] / "history.jsonl")
            differ_from = min((s for s in ours.keys() & theirs.keys() if ours[s] != theirs[s]), default=None)
    return OutageResult(
        status,
        step_at_stop,
        step_at_restart,
        during,
        unreachable_s,
        catch_up_s,
        worker_alive,
        pid_records,
        starts,
        equal,
        differ_from,
    )
