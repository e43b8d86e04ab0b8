"""The drill on the Kubernetes backend: a real envtest control plane, the process kubelet, `relay controller`.

The run is a TrainingRun object applied to the API server; the controller (kopf + the Temporal worker, its
own OS process, as in a cluster) starts the workflow and runs each leg as a Job whose pod the process kubelet
runs as a local `python -m trainer` process on a folder that plays the PVC. Faults reach the leg the way a
cluster delivers them: a preemption notice is an Eviction (the kubelet sends SIGTERM, then SIGKILL after the
grace period); a hard kill is the kubelet's own eviction (SIGKILL, pod Failed/Evicted).

Leg lifetimes come from the kubelet's record of each pod's process start and end; CheckpointQuarantined events
and the published phase are read back from the API server (what `kubectl describe` and `kubectl get` show);
"nothing left" means no Job or pod of the run remains and no process of it runs.

The control plane and kubelet are the drill's own unless a caller (the cluster test tier) lends its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from controller.drill.core import TRAINER_TEST_ENV, Check, Drill, free_port
from controller.envtest.control_plane import ControlPlane
from controller.envtest.objects import install_crd, make_namespace
from controller.envtest.process_kubelet import ProcessKubelet
from controller.kubernetes.jobs import LABEL_RUN

GROUP, VERSION, PLURAL = "relay.dev", "v1alpha1", "trainingruns"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class KubernetesDrill(Drill):
    backend_name = "kubernetes"
    restart_fault = "controller-restart"

    def __init__(
        self,
        workdir: Path,
        seed: int,
        faults: int,
        kinds: tuple[str, ...],
        *,
        namespace: str = "relay-drill",
        plane: ControlPlane | None = None,
        kubelet: ProcessKubelet | None = None,
        out: Any = sys.stdout,
    ) -> None:
        super().__init__(workdir, seed, faults, kinds, namespace, out=out)
        self.plane, self.own_plane = plane, plane is None
        self.kubelet, self.own_kubelet = kubelet, kubelet is None
        self.saved_kubelet_env: dict[str, str] = {}
        self.controller: subprocess.Popen[bytes] | None = None
        self.controller_log = self.workdir / "controller.log"
        self.kube: kubernetes.client.ApiClient | None = None
        self.pod_of_leg: dict[int, str] = {}

    # ---------------------------------------------------------------- services

    async def start_backend(self) -> None:
        if self.plane is None:  # started on this (the main) thread: its processes die with the drill
            self.say("starting the envtest control plane")
            (self.workdir / "envtest").mkdir(parents=True, exist_ok=True)
            self.plane = ControlPlane(self.workdir / "envtest")
            self.plane.start()
        self.kube = self.plane.api_client()
        await asyncio.to_thread(install_crd, self.kube)
        await asyncio.to_thread(make_namespace, self.kube, self.namespace)
        if self.kubelet is None:
            self.kubelet = ProcessKubelet(self.plane.api_client(), self.volume, self.workdir / "kubelet")
            self.kubelet.start()
        self.saved_kubelet_env = dict(self.kubelet.extra_env)
        self.kubelet.extra_env.update({**OFFLINE_ENV, **TRAINER_TEST_ENV})
        self.kubelet.volume_for_namespace[self.namespace] = self.volume
        self._start_controller()

    def _start_controller(self) -> None:
        assert self.plane is not None
        command = [sys.executable, "-m", "controller.cli", "controller", "--kubeconfig", str(self.plane.kubeconfig),
                   "--temporal-address", self.address, "--volume-root", str(self.volume), "--watch-namespace",
                   self.namespace, "--metrics-port", str(free_port()), "--health-port", str(free_port())]  # fmt: skip
        with open(self.controller_log, "ab") as log:
            self.controller = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def stop_backend(self) -> None:
        controller, self.controller = self.controller, None
        if controller is not None and controller.poll() is None:
            os.killpg(controller.pid, signal.SIGTERM)  # kopf takes up to ~30 s to stop; the drill is over
            try:
                controller.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(controller.pid, signal.SIGKILL)
                controller.wait()
        if self.kubelet is not None:
            if self.own_kubelet:
                self.kubelet.stop()
            else:
                self.kubelet.volume_for_namespace.pop(self.namespace, None)
                self.kubelet.extra_env.clear()
                self.kubelet.extra_env.update(self.saved_kubelet_env)
        if self.kube is not None:
            self.kube.close()
        if self.own_plane and self.plane is not None:
            self.plane.stop()

    async def submit(self, document: dict[str, Any]) -> None:
        body = {**document, "spec": {**document["spec"], "resources": {"cpu": "1", "gpus": 1}}}
        await asyncio.to_thread(self._custom().create_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                PLURAL, body)  # fmt: skip

    async def restart_host(self) -> str:
        assert self.controller is not None
        os.killpg(self.controller.pid, signal.SIGKILL)
        await asyncio.to_thread(self.controller.wait)
        self._start_controller()
        return "the leg kept running; the new controller adopted its Job"

    # ---------------------------------------------------------------- legs

    def _custom(self) -> Any:  # Any: the client's models are read loosely here
        return kubernetes.client.CustomObjectsApi(self.kube)

    def _core(self) -> Any:
        return kubernetes.client.CoreV1Api(self.kube)

    def running_trainer(self) -> tuple[int, int] | None:
        assert self.kubelet is not None
        prefix = f"{self.namespace}/{self.layout.run_dir.name}-leg-"
        for key in self.kubelet.running():
            if key.startswith(prefix):
                pod = key.split("/", 1)[1]
                pid = self.kubelet.pid_of(self.namespace, pod)
                leg = int(key[len(prefix) :].split("-")[0])
                if pid is not None:
                    self.pod_of_leg[leg] = pod
                    return leg, pid
        return None

    async def kill_leg(self, leg: int, pid: int, hard: bool) -> str:
        assert self.kubelet is not None
        pod = self.pod_of_leg[leg]
        if hard:
            await asyncio.to_thread(self.kubelet.pressure_evict, self.namespace, pod)
            return f"hard eviction of pod {pod} by the kubelet (SIGKILL)"
        eviction: Any = {"apiVersion": "policy/v1beta1", "kind": "Eviction", "metadata": {"name": pod}}
        await asyncio.to_thread(self._core().create_namespaced_pod_eviction, pod, self.namespace, eviction)
        return f"Eviction of pod {pod} through the API (SIGTERM)"

    def leg_log(self, leg: int) -> str:
        assert self.kubelet is not None
        pod = self.pod_of_leg.get(leg)
        return self.kubelet.pod_log(self.namespace, pod) if pod else ""

    def leg_ended(self, leg: int) -> dict[str, Any] | None:
        assert self.kubelet is not None
        pod = self.pod_of_leg.get(leg)
        if pod is None or self.kubelet.exited_at(f"{self.namespace}/{pod}") is None:
            return None
        try:
            status = self._core().read_namespaced_pod_status(pod, self.namespace).status
        except ApiException as exc:
            return {"exit_code": None, "reason": f"pod gone ({exc.status})"}
        for container in status.container_statuses or []:
            terminated = container.state.terminated if container.state else None
            if terminated is not None:
                return {"exit_code": terminated.exit_code, "reason": status.reason or terminated.reason}
        return None  # the kubelet has not reported it yet

    def check_legs_disjoint(self) -> Check:
        assert self.kubelet is not None
        prefix = f"{self.namespace}/{self.layout.run_dir.name}-leg-"
        spans: list[tuple[str, float | None, float | None]] = [
            (key.split("/", 1)[1], start, end)
            for key, (start, end) in self.kubelet.spans.items()
            if key.startswith(prefix)
        ]
        return self.spans_disjoint("legs never overlapped (pod process start and end, from the kubelet)", spans)

    async def check_nothing_left(self) -> Check:
        """The run's Jobs are deleted when it ends and their pods follow (garbage collector); wait for both."""
        assert self.kubelet is not None
        selector = f"{LABEL_RUN}={self.layout.run_dir.name}"
        batch: Any = kubernetes.client.BatchV1Api(self.kube)
        deadline = time.monotonic() + 60
        while True:
            jobs = await asyncio.to_thread(batch.list_namespaced_job, self.namespace, label_selector=selector)
            pods = await asyncio.to_thread(self._core().list_namespaced_pod, self.namespace, label_selector=selector)
            running = [key for key in self.kubelet.running() if key.startswith(f"{self.namespace}/")]
            left = [f"Job {j.metadata.name}" for j in jobs.items] + [f"pod {p.metadata.name}" for p in pods.items]
            hosts = (self.controller.pid,) if self.controller is not None else ()
            left += [f"process of {key}" for key in running] + self.processes_on_volume(hosts)
            if not left or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        return Check("no Job, pod or process of the run left", not left, ", ".join(left) or "none")

    async def quarantine_events(self) -> str:
        events = await asyncio.to_thread(
            self._core().list_namespaced_event,
            self.namespace,
            field_selector=f"involvedObject.name={self.layout.run_dir.name},reason=CheckpointQuarantined",
        )
        return "\n".join(e.message or "" for e in events.items)

    async def published_phase(self) -> Check:
        """`kubectl get trainingruns` shows Succeeded (status is published right after the workflow ends)."""
        deadline = time.monotonic() + 30
        phase = None
        while time.monotonic() < deadline:
            run = await asyncio.to_thread(self._custom().get_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                          PLURAL, self.layout.run_dir.name)  # fmt: skip
            phase = (run.get("status") or {}).get("phase")
            if phase == "Succeeded":
                break
            await asyncio.sleep(0.5)
        return Check("TrainingRun object says Succeeded", phase == "Succeeded", f"status.phase {phase}")


def envtest_missing() -> str | None:
    """Why the Kubernetes drill cannot run here, or None."""
    from controller.envtest.control_plane import assets_dir, missing_binaries

    missing = missing_binaries()
    if missing:
        return (
            f"envtest binaries missing in {assets_dir()} ({', '.join(missing)}): run `make envtest` or set "
            "KUBEBUILDER_ASSETS"
        )
    return None
