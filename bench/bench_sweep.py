"""`sweep_overhead_ratio`: trial-steps per second of a TrainingSweep against the same runs started by hand.

Four trials (a grid of four learning rates, no ASHA, so both sides train the same steps) of the tiny model on
the built-in demo reviews, on the embedded Temporal dev server with the local backend (one trainer process per
leg), the worker `relay sweep` and `relay run` use. The sweep runs them with `maxConcurrentTrials: 2`; by hand,
the same four TrainingRun workflows are started two at a time, the next as soon as one ends (the best a person
with a script does on that capacity). Both use `relay sweep`'s trial settings (await window 2 s, polls every
0.5 s). Rounds alternate (hand, sweep, sweep, hand, ...) so other load on the machine hits both alike; the
figure is the total by-hand seconds over the total sweep seconds, i.e. the sweep's trial-steps/s over the
by-hand trial-steps/s (target >= 0.95). `python -m bench.bench_sweep` prints the entry as JSON;
RELAY_BENCH_SWEEP_STEPS and RELAY_BENCH_SWEEP_ROUNDS shrink it for a smoke run. About four minutes on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.bench_trainer import entry

STEPS = int(os.environ.get("RELAY_BENCH_SWEEP_STEPS", "60"))
ROUNDS = int(os.environ.get("RELAY_BENCH_SWEEP_ROUNDS", "2"))  # each: one by hand, one sweep
CONCURRENT = 2
TRIAL_SETTINGS: dict[str, float] = {"await_window_s": 2.0, "poll_interval_s": 0.5, "heartbeat_timeout_s": 10.0}


def sweep_document(name: str, steps: int) -> dict[str, Any]:
    return {
        "apiVersion": "relay.dev/v1alpha1",
        "kind": "TrainingSweep",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "model": "tiny",
                "dataset": {"source": "demo", "maxRows": 400, "evalFraction": 0.25},
                "training": {
                    "maxSteps": steps,
                    "batchSize": 8,
                    "maxSeqLength": 32,
                    "checkpointEverySteps": max(steps // 2, 1),
                    "logEverySteps": 5,
                    "device": "cpu",
                },
                "resources": {"cpu": "1"},
            },
            "searchSpace": {"learningRate": {"type": "choice", "values": [3e-3, 1e-3, 1e-4, 1e-6]}},
            "algorithm": "grid",
            "maxConcurrentTrials": CONCURRENT,
            "objective": {"metric": "eval_loss", "goal": "minimize"},
        },
    }


async def by_hand(client: Any, task_queue: str, name: str, steps: int) -> float:
    """Seconds for the four runs, started two at a time, the next as soon as one ends."""
    from controller.messages import TrainingRunInput
    from controller.spec import workflow_id
    from controller.sweep.spec import parse_training_sweep
    from controller.workflows import CheckpointedBertTrainingWorkflow

    sweep = parse_training_sweep(sweep_document(name, steps)).spec
    specs = [(f"{name}-t{i:03d}", sweep.trial_spec(a)) for i, a in enumerate(sweep.assignments())]
    slots = asyncio.Semaphore(CONCURRENT)

    async def one(run_name: str, spec: Any) -> None:
        async with slots:
            run_input = TrainingRunInput(namespace="default", name=run_name, spec=spec, **TRIAL_SETTINGS)
            handle = await client.start_workflow(
                CheckpointedBertTrainingWorkflow.run,
                run_input,
                id=workflow_id("default", run_name),
                task_queue=task_queue,
            )
            status = await handle.result()
            if status.phase != "Succeeded":
                raise RuntimeError(f"run {run_name} ended {status.phase}")

    started = time.monotonic()
    await asyncio.gather(*(one(n, s) for n, s in specs))
    return time.monotonic() - started


async def by_sweep(client: Any, task_queue: str, name: str, steps: int) -> float:
    """Seconds for the sweep of the same four trials, two at once."""
    from controller.sweep.messages import SweepInput
    from controller.sweep.spec import parse_training_sweep, sweep_workflow_id
    from controller.sweep.workflow import TrainingSweepWorkflow

    sweep = parse_training_sweep(sweep_document(name, steps)).spec
    sweep_input = SweepInput(
        namespace="default",
        name=name,
        spec=sweep,
        trial_task_queue=task_queue,
        trial_await_window_s=TRIAL_SETTINGS["await_window_s"],
        trial_poll_interval_s=TRIAL_SETTINGS["poll_interval_s"],
        trial_heartbeat_timeout_s=TRIAL_SETTINGS["heartbeat_timeout_s"],
        watch_poll_interval_s=0.5,
    )
    started = time.monotonic()
    handle = await client.start_workflow(
        TrainingSweepWorkflow.run, sweep_input, id=sweep_workflow_id("default", name), task_queue=task_queue
    )
    status = await handle.result()
    if status.phase != "Succeeded" or status.completed != 4:
        raise RuntimeError(f"sweep {name} ended {status.phase} with {status.completed} completed: {status.message}")
    return time.monotonic() - started


async def measure(volume: Path, steps: int, rounds: int) -> dict[str, list[float]]:
    from temporalio.testing import WorkflowEnvironment

    from controller.backends.local import LocalBackend
    from controller.worker import DATA_CONVERTER, build_worker

    temporal = Path(sys.executable).parent / "temporal"
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(temporal), data_converter=DATA_CONVERTER, ui=False, dev_server_log_level="error"
    )
    seconds: dict[str, list[float]] = {"hand": [], "sweep": []}
    task_queue = f"bench-sweep-{uuid.uuid4().hex[:8]}"
    try:
        async with build_worker(env.client, LocalBackend(volume), volume, task_queue=task_queue):
            for index in range(rounds):
                order = ("hand", "sweep") if index % 2 == 0 else ("sweep", "hand")
                for label in order:
                    name = f"{label[0]}{index}"
                    run = by_hand if label == "hand" else by_sweep
                    seconds[label].append(await run(env.client, task_queue, name, steps))
    finally:
        await env.shutdown()
    return seconds


def run(out: dict[str, Any]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = os.environ.get("RELAY_BENCH_DIR") or None
    volume = Path(tempfile.mkdtemp(prefix="relay-bench-sweep-", dir=root))
    try:
        seconds = asyncio.run(measure(volume, STEPS, ROUNDS))
    finally:
        shutil.rmtree(volume, ignore_errors=True)
    hand, swept = sum(seconds["hand"]), sum(seconds["sweep"])
    trial_steps = 4 * STEPS * ROUNDS
    rounds = ", ".join(f"{h:.1f}/{s:.1f}" for h, s in zip(seconds["hand"], seconds["sweep"], strict=True))
    out["sweep_overhead_ratio"] = entry(
        hand / swept,
        "sweep trial-steps/s over by-hand trial-steps/s",
        ">= 0.95",
        f"4 trials x {STEPS} steps (tiny model, demo data, local backend, embedded Temporal), 2 at once; {ROUNDS} "
        f"alternating rounds: sweep {trial_steps / swept:.2f} trial-steps/s ({swept:.1f} s), by hand "
        f"{trial_steps / hand:.2f} ({hand:.1f} s; seconds by hand/sweep per round {rounds})",
    )


if __name__ == "__main__":
    results: dict[str, Any] = {}
    run(results)
    print(json.dumps(results, indent=2))
