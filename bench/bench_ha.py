"""High-availability benchmarks: leader failover time, runs disrupted by a rolling upgrade, a 60 s Temporal outage.

`run(out)` adds `{"value", "unit", "target", "method"}` entries; `python -m bench.bench_ha` prints them as JSON.
The Kubernetes figures start their own envtest control plane, the process kubelet running the stand-in trainer
(`relay_testing/standin_trainer.py`), a Temporal dev server and `relay controller` replicas as OS processes
(`relay_testing.ha_scenarios`, the scenarios tests/kubernetes runs with small numbers):

- `controller_failover_s`: median over RELAY_BENCH_HA_KILLS (default 5) SIGKILLs of the Lease holder mid-leg, from
  the kill until the other replica has handled a TrainingRun created just after it (a fresh replica replaces
  the killed one each time). Target: 15 s median.
- `upgrade_runs_disrupted`: RELAY_BENCH_HA_RUNS (default 20) runs train while the new replica starts and the old
  one is SIGTERMed; runs with a leg launched again, a preemption, a failure or no success. Target: 0.
- `temporal_outage_60s_ok`: the local backend and the real trainer (tiny BERT): the Temporal server stops for
  RELAY_BENCH_HA_OUTAGE_S (default 60) s mid-leg; 1 when the leg trained and checkpointed during the outage,
  the worker process stayed up, the run succeeded with one leg launched once and the uninterrupted run's weights.

Scratch files go to $RELAY_BENCH_DIR (default: the system temp folder). About 6 minutes on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from controller.devserver import DevServer
from relay_testing.control_plane import ControlPlane, free_port, missing_binaries
from relay_testing.ha_scenarios import rolling_upgrade, sigkill_failover
from relay_testing.local_outage import run_through_outage
from relay_testing.objects import install_crd, make_namespace
from relay_testing.process_kubelet import ProcessKubelet
from relay_testing.replicas import ControllerReplica, controller_args

KILLS = int(os.environ.get("RELAY_BENCH_HA_KILLS", "5"))
RUNS = int(os.environ.get("RELAY_BENCH_HA_RUNS", "20"))
OUTAGE_S = float(os.environ.get("RELAY_BENCH_HA_OUTAGE_S", "60"))
OUTAGE_STEPS = int(os.environ.get("RELAY_BENCH_HA_OUTAGE_STEPS", "6000"))  # 40-70 steps/s: past a 60 s outage


def entry(value: float, unit: str, target: str, method: str) -> dict[str, Any]:
    return {"value": round(float(value), 4), "unit": unit, "target": target, "method": method}


async def kubernetes_figures(scratch: Path) -> dict[str, Any]:
    scratch.mkdir(parents=True)
    plane = ControlPlane(scratch / "envtest")
    plane.root.mkdir(parents=True)
    temporal = DevServer(f"127.0.0.1:{free_port()}", None, log_file=scratch / "temporal.log")
    volume = scratch / "volume"
    volume.mkdir()
    kubelet: ProcessKubelet | None = None
    figures: dict[str, Any] = {}
    try:
        temporal.start()
        plane.start()
        kube = plane.api_client()
        install_crd(kube)
        kubelet = ProcessKubelet(plane.api_client(), volume, scratch / "kubelet", gpus=RUNS + KILLS + 4).start()

        def starter(namespace: str, queue: str) -> Any:
            args = controller_args(temporal.address, plane.kubeconfig, namespace, volume, queue)
            return lambda name: ControllerReplica(name, args, scratch)

        make_namespace(kube, "failover")
        times = await sigkill_failover(
            kube, "failover", volume, kubelet, starter("failover", "bench-ha-fo"), kills=KILLS
        )
        each = ", ".join(f"{t:.1f}" for t in times)
        figures["controller_failover_s"] = entry(
            statistics.median(times),
            "s",
            "<= 15 (median)",
            f"median of {len(times)} SIGKILLs of the Lease holder mid-leg (2 `relay controller` processes, envtest, "
            f"10 s Lease): kill to the survivor handling a new TrainingRun; each: {each}",
        )
        print(json.dumps({"controller_failover_s": figures["controller_failover_s"]}), flush=True)

        make_namespace(kube, "upgrade")
        result = await rolling_upgrade(
            kube, "upgrade", volume, kubelet, starter("upgrade", "bench-ha-up"), runs=RUNS, steps=160,
            finish_timeout_s=300,
        )  # fmt: skip
        figures["upgrade_runs_disrupted"] = entry(
            len(result.disrupted),
            "runs",
            "0",
            f"{RUNS} runs training (stand-in trainer, 40 s legs) while the new replica starts and the old one is "
            f"SIGTERMed (handover {result.handover_s:.1f} s, old replica exit {result.old_exit}); a run counts when "
            f"a leg was launched again (pods, LegStarted Events, legCount), preempted, failed or not Succeeded"
            + (f": {result.disrupted}" if result.disrupted else ""),
        )
        print(json.dumps({"upgrade_runs_disrupted": figures["upgrade_runs_disrupted"]}), flush=True)
    finally:
        if kubelet is not None:
            kubelet.stop()
        plane.stop()
        temporal.stop()
    return figures


async def outage_figure(scratch: Path) -> dict[str, Any]:
    began = time.monotonic()
    result = await run_through_outage(scratch / "outage", steps=OUTAGE_STEPS, outage_s=OUTAGE_S)
    status = result.status
    checks = {
        "trained during the outage": result.step_at_restart > result.step_at_stop,
        "checkpointed during the outage": bool(result.checkpoints_during),
        "worker stayed up": result.worker_alive,
        "Succeeded": status.phase.value == "Succeeded",
        "one leg, launched once": len(status.legs) == 1
        and result.pid_records == ["0.pid.json"]
        and result.trainer_starts == 1,
        "uninterrupted weights": result.weights_equal,  # losses_differ_from names where the two runs parted
    }
    failed = [name for name, ok in checks.items() if not ok]
    newest = max(result.checkpoints_during, default=0)
    return {
        "temporal_outage_60s_ok": entry(
            0.0 if failed else 1.0,
            "bool",
            "1",
            f"local backend, real trainer (tiny BERT, {OUTAGE_STEPS} steps), `relay worker` process: Temporal dev "
            f"server (db file) down {result.unreachable_s:.0f} s mid-leg; steps {result.step_at_stop} -> "
            f"{result.step_at_restart} meanwhile, newest checkpoint then step {newest}, succeeded "
            f"{result.catch_up_s:.0f} s after the restart ({time.monotonic() - began:.0f} s in all)"
            + (f"; FAILED: {', '.join(failed)}" if failed else "; every check held")
            + (f" (losses differ from step {result.losses_differ_from})" if result.losses_differ_from else ""),
        )
    }


def run(out: dict[str, Any]) -> None:
    missing = missing_binaries()
    if missing:
        raise RuntimeError(f"envtest binaries missing ({', '.join(missing)}): run `make envtest`")
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-ha-", dir=os.environ.get("RELAY_BENCH_DIR")))
    out.update(asyncio.run(kubernetes_figures(scratch / "k8s")))
    out.update(asyncio.run(outage_figure(scratch)))


if __name__ == "__main__":
    results: dict[str, Any] = {}
    run(results)
    print(json.dumps(results, indent=2))
