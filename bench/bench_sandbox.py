"""What Temporal's workflow sandbox costs the controller per run: memory, CPU and start latency.

`python -m bench.bench_sandbox [--runs 100]` runs one child process per worker set-up, each with its own
embedded Temporal dev server and the production worker's settings (task queue, data converter, pollers,
activity slots) but instant fake activities under the real names. A child starts one warm-up run, then
`--runs` training workflows at once; each run goes snapshot -> prepare -> launch_leg and then waits in a long
await_leg, so every workflow stays cached in the worker, as a real run does while its leg trains. Per run:
  - rss_kb_per_run: growth of the child's VmRSS (/proc/self/status) from before the burst to when every run
    has launched its leg, divided by the runs (the sandbox keeps a copy of each run's workflow modules);
  - cpu_ms_per_run: the child's CPU time over the same span, divided by the runs (worker, client and fakes
    share the process; only the runner differs between set-ups);
  - start latency: start_workflow called -> launch_leg running, median and 95th percentile over the burst.
Set-ups: `passthrough` (controller.workflows passed through, the production worker until issue 10) and
`default` (controller.worker.WORKFLOW_RUNNER as it is now). Each set-up runs `--repeat` times, alternating;
the medians are printed as one JSON object. About a minute and a half at 100 runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import PollerBehaviorAutoscaling, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from controller import worker as production
from controller.leg_model import LegHandle
from controller.messages import (
    AwaitLegRequest,
    AwaitLegResult,
    LaunchLegRequest,
    LaunchLegResult,
    LegProgress,
    PrepareRunRequest,
    PrepareRunResult,
    PublishStatusRequest,
    RecordLegRequest,
    SnapshotRequest,
    SnapshotResult,
    TrainingRunInput,
)
from controller.spec import DatasetSpec, TrainingRunSpec
from controller.workflows import CheckpointedBertTrainingWorkflow
from trainer.config import TrainingSettings

SETUPS = ("passthrough", "default")
AWAIT_WINDOW_S = 300.0  # longer than a child lives: every run stays inside its first await_leg
LAUNCHED: dict[str, float] = {}  # workflow id -> when its first launch_leg ran (monotonic)


def _vm_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


class InstantActivities:
    """The activities a run needs to reach its first await_leg, instant; await_leg just waits."""

    @activity.defn(name="snapshot_dataset")
    async def snapshot_dataset(self, request: SnapshotRequest) -> SnapshotResult:
        return SnapshotResult(sha256="ab" * 32, path="snapshots/x", rows={"train": 80}, fields=[], reused=True)

    @activity.defn(name="prepare_run")
    async def prepare_run(self, request: PrepareRunRequest) -> PrepareRunResult:
        path = f"runs/{request.namespace}/{request.name}"
        return PrepareRunResult(run_path=path, config_path=path + "/config.json", total_steps=30,
                                latest_checkpoint=None)  # fmt: skip

    @activity.defn(name="launch_leg")
    async def launch_leg(self, request: LaunchLegRequest) -> LaunchLegResult:
        LAUNCHED.setdefault(activity.info().workflow_id, time.monotonic())
        handle = LegHandle(leg=request.leg.leg, backend_id="bench", started_at=0.0)
        return LaunchLegResult(handle=handle, start_step=0, started_at="2026-01-01T00:00:00Z")

    @activity.defn(name="await_leg")
    async def await_leg(self, request: AwaitLegRequest) -> AwaitLegResult:
        await asyncio.sleep(request.max_wait_s)
        return AwaitLegResult(terminated=False, progress=LegProgress())

    @activity.defn(name="record_leg")
    async def record_leg(self, request: RecordLegRequest) -> None:
        return None

    @activity.defn(name="publish_status")
    async def publish_status(self, request: PublishStatusRequest) -> None:
        return None


async def _child(setup: str, runs: int) -> dict[str, Any]:
    fakes = InstantActivities()
    if setup == "passthrough":
        runner = SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules("controller.workflows")
        )
    else:
        runner = production.WORKFLOW_RUNNER
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        data_converter=production.DATA_CONVERTER,
        dev_server_log_level="error",
        ui=False,
    )
    task_queue = f"bench-sandbox-{uuid.uuid4()}"
    spec = TrainingRunSpec(dataset=DatasetSpec(source="demo"), training=TrainingSettings(max_steps=30))
    try:
        async with Worker(
            env.client,
            task_queue=task_queue,
            workflows=production.WORKFLOWS,
            activities=[
                fakes.snapshot_dataset,
                fakes.prepare_run,
                fakes.launch_leg,
                fakes.await_leg,
                fakes.record_leg,
                fakes.publish_status,
            ],
            max_concurrent_activities=production.MAX_CONCURRENT_ACTIVITIES,
            workflow_runner=runner,
            workflow_task_poller_behavior=PollerBehaviorAutoscaling(),
            activity_task_poller_behavior=PollerBehaviorAutoscaling(),
        ):
            handles = []

            async def start(name: str) -> float:
                run_input = TrainingRunInput(namespace="bench", name=name, spec=spec, await_window_s=AWAIT_WINDOW_S,
                                             heartbeat_timeout_s=AWAIT_WINDOW_S * 2)  # fmt: skip
                started = time.monotonic()
                handles.append(
                    await env.client.start_workflow(
                        CheckpointedBertTrainingWorkflow.run,
                        run_input,
                        id=f"trainingrun-bench-{name}",
                        task_queue=task_queue,
                    )
                )
                return started

            async def until_launched(count: int, timeout_s: float = 120.0) -> None:
                deadline = time.monotonic() + timeout_s
                while len(LAUNCHED) < count:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{setup}: {len(LAUNCHED)} of {count} runs launched their leg")
                    await asyncio.sleep(0.02)

            await start("warm-up")  # the worker's one-time imports and caches are not a run's cost
            await until_launched(1)
            await asyncio.sleep(1.0)
            gc.collect()
            rss_before, cpu_before, wall_before = _vm_rss_kb(), time.process_time(), time.monotonic()
            names = [f"run-{i:04d}" for i in range(runs)]
            started = dict(zip(names, await asyncio.gather(*(start(n) for n in names)), strict=True))
            await until_launched(runs + 1)
            cpu_ms = (time.process_time() - cpu_before) * 1000
            wall_s = time.monotonic() - wall_before
            gc.collect()
            rss_after = _vm_rss_kb()
            latencies = sorted(LAUNCHED[f"trainingrun-bench-{n}"] - started[n] for n in names)
            await asyncio.gather(*(h.terminate("bench done") for h in handles))
    finally:
        await env.shutdown()
    return {
        "setup": setup,
        "runs": runs,
        "rss_kb_per_run": round((rss_after - rss_before) / runs, 1),
        "cpu_ms_per_run": round(cpu_ms / runs, 2),
        "start_latency_median_s": round(statistics.median(latencies), 3),
        "start_latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        "burst_wall_s": round(wall_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="children per set-up; medians are reported")
    parser.add_argument("--extrapolate", type=int, default=500, help="runs to extrapolate the memory cost to")
    parser.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args.child, args.runs))), flush=True)
        # Skip interpreter finalization: the SDK's core thread can still hold the GIL then ("PyGILState_Release:
        # thread state must be current", seen once in three runs), which would fail a finished measurement.
        os._exit(0)
    runs: dict[str, list[dict[str, Any]]] = {setup: [] for setup in SETUPS}
    for _ in range(args.repeat):  # set-ups alternate, so a burst of load elsewhere hits both alike
        for setup in SETUPS:  # a fresh process each: RSS and caches of one set-up never mix with the other's
            command = [sys.executable, "-m", "bench.bench_sandbox", "--child", setup, "--runs", str(args.runs)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{setup}: {done.stderr[-2000:]}")
            runs[setup].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results: dict[str, Any] = {"load_average_after": os.getloadavg()[0]}
    for setup, measured in runs.items():  # the median of each figure over the repeats
        results[setup] = {key: statistics.median(m[key] for m in measured) for key in measured[0] if key != "setup"}
        results[setup]["rss_kb_per_run_each"] = [m["rss_kb_per_run"] for m in measured]
    extra_kb = results["default"]["rss_kb_per_run"] - results["passthrough"]["rss_kb_per_run"]
    extra_ms = results["default"]["cpu_ms_per_run"] - results["passthrough"]["cpu_ms_per_run"]
    results["default_minus_passthrough"] = {
        "rss_kb_per_run": round(extra_kb, 1),
        "cpu_ms_per_run": round(extra_ms, 2),
        f"rss_mb_at_{args.extrapolate}_runs": round(extra_kb * args.extrapolate / 1024, 1),
        f"cpu_s_at_{args.extrapolate}_run_starts": round(extra_ms * args.extrapolate / 1000, 2),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
