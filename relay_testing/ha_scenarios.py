"""Two high-availability scenarios on a cluster with stand-in trainer pods: a rolling upgrade, a SIGKILL failover.

`rolling_upgrade`: while N runs train, the new replica starts, then the old one gets SIGTERM (a Deployment's
rolling update with maxUnavailable 0); a run is disrupted when any of its legs was launched again (a second pod,
a second LegStarted Event, more than one leg) or it did not succeed. `sigkill_failover`: the Lease holder is
SIGKILLed mid-leg; the seconds until the other replica handles a new TrainingRun. tests/kubernetes and
bench/bench_ha.py run both, with small and large numbers.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes

from relay_testing.process_kubelet import ProcessKubelet
from relay_testing.replicas import ControllerReplica, lease_holder, wait_until
from trainer.volume import list_checkpoint_dirs

StartReplica = Callable[[str], ControllerReplica]


def standin_spec(steps: int) -> dict[str, Any]:
    return {
        "dataset": {"source": "demo", "maxRows": 40},
        "training": {"maxSteps": steps, "checkpointEverySteps": 10},
        "resources": {"cpu": "100m", "memory": "64Mi", "gpus": 1},
        "terminationGracePeriodSeconds": 5,
        "retries": {"backoffSeconds": 0.5},
    }


class Runs:
    """TrainingRuns of one namespace, read through the admin client."""

    def __init__(self, kube: kubernetes.client.ApiClient, namespace: str) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(kube)
        self.core = kubernetes.client.CoreV1Api(kube)
        self.namespace = namespace

    def create(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": "relay.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name}, "spec": spec}
        self.custom.create_namespaced_custom_object("relay.dev", "v1alpha1", self.namespace, "trainingruns", body)

    def status(self, name: str) -> dict[str, Any]:
        run: Any = self.custom.get_namespaced_custom_object(
            "relay.dev", "v1alpha1", self.namespace, "trainingruns", name
        )
        return run.get("status") or {}

    def phase(self, name: str) -> str | None:
        return self.status(name).get("phase")

    def finished(self, names: list[str]) -> dict[str, dict[str, Any]] | None:
        statuses = {name: self.status(name) for name in names}
        done = all(s.get("phase") in ("Succeeded", "Failed") for s in statuses.values())
        return statuses if done else None

    def event_reasons(self, name: str) -> list[str]:
        events = self.core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={name}")
        return [str(e.reason) for e in events.items]


def pods_started(kubelet: ProcessKubelet, namespace: str, run: str) -> list[str]:
    """The Jobs whose pods the kubelet started for `run` (one entry per pod start)."""
    return [p.split("/")[1].rsplit("-", 1)[0] for p in kubelet.started if p.startswith(f"{namespace}/{run}-")]


@dataclass
class UpgradeResult:
    runs: list[str]
    disrupted: dict[str, str] = field(default_factory=dict)  # run -> what happened to it
    handover_s: float = 0.0  # from the old replica's SIGTERM until the new one held the Lease
    old_exit: int | None = None
    new_exit: int | None = None  # SIGTERMed at the end, after it ran the runs' activities
    seconds: float = 0.0


async def rolling_upgrade(
    kube: kubernetes.client.ApiClient,
    namespace: str,
    volume_root: Path,
    kubelet: ProcessKubelet,
    start: StartReplica,
    *,
    runs: int,
    steps: int = 120,
    step_s: float = 0.25,
    finish_timeout_s: float = 180,
) -> UpgradeResult:
    """Old replica alone, `runs` runs started and checkpointing, new replica up, old one SIGTERMed, all finish."""
    began = time.monotonic()
    kubelet.module_map = {"trainer": "relay_testing.standin_trainer"}
    kubelet.extra_env.update(
        {"RELAY_STANDIN_STEPS": str(steps), "RELAY_STANDIN_STEP_S": str(step_s), "RELAY_STANDIN_CHECKPOINT_EVERY": "10"}
    )
    api = Runs(kube, namespace)
    old = start("relay-old")
    replicas = [old]
    try:
        await wait_until(
            "the old replica to lead", lambda: lease_holder(kube, namespace, replicas) is old, 120, replicas
        )
        names = [f"up-{i}-{uuid.uuid4().hex[:4]}" for i in range(runs)]
        for name in names:
            await asyncio.to_thread(api.create, name, standin_spec(steps))

        def all_checkpointed() -> bool:
            folders = (volume_root / f"runs/{namespace}/{name}/checkpoints" for name in names)
            return all(list_checkpoint_dirs(folder) for folder in folders)

        await wait_until("every run's first checkpoint", all_checkpointed, 60 + 3 * runs, replicas)
        new = start("relay-new")
        replicas.append(new)
        await wait_until("the new replica to poll and campaign", new.campaigning, 90, replicas)
        stopped_at = time.monotonic()
        old_exit = await asyncio.to_thread(old.stop, 30)
        await wait_until(
            "the new replica to lead", lambda: lease_holder(kube, namespace, replicas) is new, 60, replicas
        )
        handover_s = time.monotonic() - stopped_at
        statuses = await wait_until("every run to finish", lambda: api.finished(names), finish_timeout_s, replicas)
        result = UpgradeResult(names, handover_s=handover_s, old_exit=old_exit)
        for name, status in statuses.items():
            pods = pods_started(kubelet, namespace, name)
            starts = (await asyncio.to_thread(api.event_reasons, name)).count("LegStarted")
            facts = (status.get("phase"), status.get("legCount"), status.get("preemptions"), status.get("failures"))
            if facts != ("Succeeded", 1, 0, 0) or pods != [f"{name}-leg-0"] or starts != 1:
                result.disrupted[name] = f"status {facts}, pods {pods}, LegStarted x{starts}: {status.get('message')}"
        result.new_exit = await asyncio.to_thread(new.stop, 30)
        result.seconds = time.monotonic() - began
        return result
    finally:
        for replica in replicas:
            replica.stop()


async def sigkill_failover(
    kube: kubernetes.client.ApiClient,
    namespace: str,
    volume_root: Path,
    kubelet: ProcessKubelet,
    start: StartReplica,
    *,
    kills: int,
) -> list[float]:
    """`kills` times: SIGKILL the Lease holder while a run's leg trains, create a run, time until it has a phase
    (the survivor leads and handles it); a fresh replica replaces the killed one each time."""
    kubelet.module_map = {"trainer": "relay_testing.standin_trainer"}
    kubelet.extra_env.update(
        {"RELAY_STANDIN_STEPS": "100000", "RELAY_STANDIN_STEP_S": "0.25", "RELAY_STANDIN_CHECKPOINT_EVERY": "10"}
    )
    api = Runs(kube, namespace)
    replicas = [start("relay-a"), start("relay-b")]
    alive = list(replicas)
    times: list[float] = []
    try:
        long_run = f"long-{uuid.uuid4().hex[:4]}"
        await asyncio.to_thread(api.create, long_run, standin_spec(100000))
        for kill in range(kills):
            leader = await wait_until("a leader", lambda: lease_holder(kube, namespace, alive), 120, replicas)
            await wait_until("the long run's leg", lambda: api.status(long_run).get("phase") == "Running", 90, replicas)
            for replica in alive:
                if replica is not leader:
                    await wait_until(f"{replica.name} to campaign", replica.campaigning, 90, replicas)
            await asyncio.to_thread(leader.kill)
            killed_at = time.monotonic()
            alive.remove(leader)
            probe = f"probe-{kill}-{uuid.uuid4().hex[:4]}"
            await asyncio.to_thread(api.create, probe, standin_spec(10))
            await wait_until("the new leader to handle the probe", functools.partial(api.phase, probe), 90, replicas)
            times.append(time.monotonic() - killed_at)
            replacement = start(f"relay-{kill}-{uuid.uuid4().hex[:4]}")
            replicas.append(replacement)
            alive.append(replacement)
        return times
    finally:
        for replica in replicas:
            replica.stop(10)
