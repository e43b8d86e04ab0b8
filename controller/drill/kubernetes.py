"""The drill on the Kubernetes backend, against whatever cluster a kubeconfig names (a staging cluster, or envtest).

The run is a TrainingRun object applied to that cluster's API server; `relay controller` (kopf + the Temporal
worker, its own OS process on this machine) watches the drill's namespace, starts the workflow and runs each leg
as a Job. This machine must see the namespace's `relay-shared` claim as a folder (`ClusterTarget.volume`): the
controller's activities and the drill's checks read the run folder there. The TrainingRun CRD and the namespace
with its claim must exist (the Helm chart makes them).

Faults reach a leg through the API, as a cluster delivers them: a preemption notice is an Eviction (policy/v1
where the server offers it, v1beta1 on older servers: controller.kubernetes.server.evict_pod; the kubelet sends
SIGTERM, then SIGKILL after the grace period); a hard kill is a delete with gracePeriodSeconds=0. Leg lifetimes
come from a watch of the run's pods (container start and finish times, or the moment a force-deleted pod
vanished); CheckpointQuarantined events and the published phase are read back from the API server (what
`kubectl describe` and `kubectl get` show); "nothing left" means no Job or pod of the run remains.

Faults that need the trainer's process itself (SIGKILL inside a checkpoint write, SIGSTOP to corrupt the newest
checkpoint, a full volume) are offered only by a harness that plays the node (`NodeAccess`: the test support's
process kubelet, whose pods are processes on this machine); with one, the hard kill is its own pressure eviction
and leg lifetimes are its record of each pod process.

Known limit on a real cluster: the shared core tells a new trainer from the one before by the pid in
progress.json, and a trainer that is its container's pid 1 writes the same pid every leg, so recovery from a
fault there is not seen (the drill times out). On the process kubelet, pods are host processes with their own pids.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import kubernetes
import yaml
from kubernetes.client.rest import ApiException

from controller.drill.core import (
    FENCED_EXIT,
    NODE_LOST_S,
    RUN_NAME,
    Check,
    Drill,
    DrillError,
    FaultRecord,
    FencedLeg,
    fence_moved_at,
    free_port,
    late_commits,
)
from controller.kubernetes.jobs import LABEL_RUN
from controller.kubernetes.server import evict_pod, server_features
from trainer.volume import RunLayout

GROUP, VERSION, PLURAL = "relay.dev", "v1alpha1", "trainingruns"
CRD_NAME = f"{PLURAL}.{GROUP}"
API_FAULTS = ("sigterm", "sigkill", "controller-restart", "server-restart")  # what any cluster allows
NODE_FAULTS = ("sigkill-in-write", "corrupt-newest", "enospc", "stalled-leg")  # need the trainer's process here
PARTITION_FAULTS = ("node-lost",)  # need a harness that can cut a node off (PartitionAccess)


class NodeAccess(Protocol):
    """What a harness that plays the cluster's node offers beyond the API (relay_testing's ProcessKubelet)."""

    @property
    def spans(self) -> dict[str, tuple[float, float | None]]: ...  # "<ns>/<pod>" -> (start, end), end None: alive

    def pressure_evict(self, namespace: str, name: str) -> None: ...  # SIGKILL, pod Failed/Evicted

    def pid_of(self, namespace: str, name: str) -> int | None: ...  # the pod's process here, while it runs

    def running(self) -> list[str]: ...  # "<ns>/<pod>" of every pod whose process runs

    def exited_at(self, key: str) -> float | None: ...

    def pod_log(self, namespace: str, name: str) -> str: ...


class PartitionAccess(NodeAccess, Protocol):
    """A node harness that can also partition the node running a pod, and heal it (relay_testing.drill)."""

    def lose_node(self, namespace: str, name: str) -> str: ...  # cut off + Ready=Unknown; a line for the table

    def restore_node(self) -> str: ...  # the lost node reports again, Ready=True

    def exit_code(self, namespace: str, name: str) -> int | None: ...  # the pod process's, once it ended


@dataclass(frozen=True)
class ClusterTarget:
    """Where the drill runs: a kubeconfig (None: $KUBECONFIG, else ~/.kube/config) and context (None: its
    current one), the namespace, and the folder where this machine sees that namespace's `relay-shared` claim."""

    kubeconfig: Path | None
    context: str | None
    namespace: str
    volume: Path | None

    def kubeconfig_path(self) -> Path:
        if self.kubeconfig is not None:
            return self.kubeconfig
        from_env = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
        return Path(from_env) if from_env else Path.home() / ".kube" / "config"

    def problem(self) -> str | None:
        """Why the drill cannot start on this target (one line naming the flag), or None."""
        path = self.kubeconfig_path()
        if not path.is_file():
            return f"--kubeconfig {path}: no such file"
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            return f"--kubeconfig {path}: not a kubeconfig ({exc.__class__.__name__})"
        if not isinstance(document, dict):
            return f"--kubeconfig {path}: not a kubeconfig (no mapping)"
        contexts = [c.get("name") for c in document.get("contexts") or [] if isinstance(c, dict)]
        if self.context is not None and self.context not in contexts:
            return f"--context {self.context}: not in {path} (contexts: {', '.join(map(str, contexts)) or 'none'})"
        if self.volume is None:
            return "--run-volume: required (this machine's mount of the namespace's claim relay-shared)"
        if not self.volume.is_dir():
            return f"--run-volume {self.volume}: no such folder (this machine's mount of the claim relay-shared)"
        earlier = RunLayout.for_run(self.volume, self.namespace, RUN_NAME).run_dir
        if earlier.exists():
            return f"--run-volume {self.volume}: {earlier.relative_to(self.volume)} holds an earlier drill; remove it"
        return None


def _epoch(timestamp: str | None) -> float | None:
    """An RFC 3339 time of the API ("2026-11-29T19:00:01Z", second resolution) as time.time()."""
    if not timestamp:
        return None
    return float(calendar.timegm(time.strptime(timestamp[:19], "%Y-%m-%dT%H:%M:%S")))


class PodWatch:
    """The run's pods as the API server shows them, kept by a watch: latest object and container lifetime each.

    Pods are read here many times a second (the drill polls while it aims faults), and a run's pods are gone
    (Jobs deleted, pods collected) by the time the checks read lifetimes, so both come from this record.
    """

    def __init__(self, kube: kubernetes.client.ApiClient, namespace: str, selector: str) -> None:
        self.core = kubernetes.client.CoreV1Api(kube)
        self.namespace, self.selector = namespace, selector
        self.pods: dict[str, dict[str, Any]] = {}  # live pods by name
        self.gone: set[str] = set()
        self.spans: dict[str, tuple[float | None, float | None]] = {}  # by pod name, API times
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drill-pod-watch", daemon=True)

    def start(self) -> PodWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        """List, then watch from that list's version; each (re)start lists again, so a pod deleted while no
        watch ran is noticed too."""
        while not self._stop.is_set():
            watcher = kubernetes.watch.Watch()
            try:
                listed: Any = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector)
                present = {pod.metadata.name for pod in listed.items}
                for name in [n for n in list(self.pods) if n not in present]:
                    self._record("DELETED", {"metadata": {"name": name}})
                for pod in listed.items:
                    self._record("MODIFIED", self.core.api_client.sanitize_for_serialization(pod))
                stream = watcher.stream(
                    self.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=5,
                    deserialize=False,
                )
                for event in stream:
                    if event["type"] == "ERROR":  # e.g. 410 Gone: list again
                        break
                    self._record(event["type"], event["object"])
                    if self._stop.is_set():
                        watcher.stop()
            except Exception as exc:  # the API server restarting, a dropped connection: watch again
                if not self._stop.is_set():
                    print(f"drill: pod watch error {exc!r}", file=sys.stderr)
                    time.sleep(0.5)

    def _record(self, kind: str, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        start, end = self.spans.get(name, (None, None))
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            state = status.get("state") or {}
            start = start or _epoch((state.get("running") or state.get("terminated") or {}).get("startedAt"))
            end = end or _epoch((state.get("terminated") or {}).get("finishedAt"))
        with self._lock:
            if kind == "DELETED":
                self.pods.pop(name, None)
                self.gone.add(name)
                end = end or (time.time() if start is not None else None)  # force-deleted while it ran
            else:
                self.pods[name] = pod
            if start is not None:
                self.spans[name] = (start, end)

    def get(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self.pods.get(name)

    def running(self) -> list[str]:
        with self._lock:
            return [
                name
                for name, pod in self.pods.items()
                if (pod.get("status") or {}).get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")
            ]


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
        cluster: ClusterTarget,
        node: NodeAccess | None = None,
        out: Any = sys.stdout,
    ) -> None:
        super().__init__(workdir, seed, faults, kinds, cluster.namespace, out=out)
        if cluster.volume is None:
            raise DrillError("the Kubernetes drill needs the run volume's folder (--run-volume)")
        self.volume = cluster.volume
        self.layout = RunLayout.for_run(self.volume, cluster.namespace, RUN_NAME)
        self.cluster, self.node = cluster, node
        self.controller: subprocess.Popen[bytes] | None = None
        self.controller_log = self.workdir / "controller.log"
        self.kube: kubernetes.client.ApiClient | None = None
        self.watch: PodWatch | None = None
        self.eviction_api = "policy/v1"
        self.pod_of_leg: dict[int, str] = {}
        self.fenced: dict[str, FencedLeg] = {}  # node-lost legs by pod name

    # ---------------------------------------------------------------- services

    async def start_backend(self) -> None:
        config = str(self.cluster.kubeconfig_path())
        self.kube = kubernetes.config.new_client_from_config(config_file=config, context=self.cluster.context)
        await asyncio.to_thread(self._check_cluster)
        features = await asyncio.to_thread(server_features, self.kube)
        self.eviction_api = f"policy/{features.policy_version}"
        self.say(f"cluster {self.kube.configuration.host} (Kubernetes {features.major}.{features.minor}), namespace "
                 f"{self.namespace}, Eviction via {self.eviction_api}, volume {self.volume}")  # fmt: skip
        self.watch = PodWatch(self.kube, self.namespace, f"{LABEL_RUN}={RUN_NAME}").start()
        self._start_controller()

    def _check_cluster(self) -> None:
        """The CRD and the namespace exist, and no TrainingRun of an earlier drill is left in it."""
        extensions: Any = kubernetes.client.ApiextensionsV1Api(self.kube)
        reads = {
            f"CRD {CRD_NAME}": lambda: extensions.read_custom_resource_definition(CRD_NAME),
            f"namespace {self.namespace}": lambda: self._core().read_namespace(self.namespace),
        }
        for what, read in reads.items():
            try:
                read()
            except ApiException as exc:
                raise DrillError(f"{what}: {exc.status} {exc.reason} (the chart's CRD and a namespace with the "
                                 "claim relay-shared must exist)") from None  # fmt: skip
        with contextlib.suppress(ApiException):
            self._custom().get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, RUN_NAME)
            raise DrillError(f"namespace {self.namespace}: TrainingRun {RUN_NAME!r} of an earlier drill exists")

    def _controller_kubeconfig(self) -> Path:
        """The kubeconfig with the chosen context as its current one (the controller takes no --context)."""
        source = self.cluster.kubeconfig_path()
        if self.cluster.context is None:
            return source
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
        document["current-context"] = self.cluster.context
        copy = self.workdir / "controller.kubeconfig"
        copy.write_text(yaml.safe_dump(document), encoding="utf-8")
        copy.chmod(0o600)
        return copy

    def _start_controller(self) -> None:
        kubeconfig = str(self._controller_kubeconfig())
        command = [sys.executable, "-m", "controller.cli", "controller", "--kubeconfig", kubeconfig,
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
        if self.watch is not None:
            self.watch.stop()
        if self.kube is not None:
            self.kube.close()

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
        """With a node harness, its pod process; else a Running leg pod and the pid its trainer wrote."""
        assert self.watch is not None
        prefix = f"{RUN_NAME}-leg-"
        if self.node is not None:
            pods = [key.split("/", 1)[1] for key in self.node.running() if key.startswith(f"{self.namespace}/")]
        else:
            pods = self.watch.running()
        for pod in pods:
            if not pod.startswith(prefix):
                continue
            leg = int(pod[len(prefix) :].split("-")[0])
            pid = self.node.pid_of(self.namespace, pod) if self.node is not None else self.progress().get("pid")
            if pid is not None:
                self.pod_of_leg[leg] = pod
                return leg, int(pid)
        return None

    async def kill_leg(self, leg: int, pid: int, hard: bool) -> str:
        pod = self.pod_of_leg[leg]
        if hard and self.node is not None:
            await asyncio.to_thread(self.node.pressure_evict, self.namespace, pod)
            return f"hard eviction of pod {pod} by the kubelet (SIGKILL)"
        if hard:
            await asyncio.to_thread(self._core().delete_namespaced_pod, pod, self.namespace, grace_period_seconds=0)
            return f"force delete of pod {pod} (gracePeriodSeconds=0: SIGKILL)"
        assert self.kube is not None
        evicted = await asyncio.to_thread(evict_pod, self.kube, self.namespace, pod)
        if not evicted:
            raise DrillError(f"Eviction of pod {pod}: the pod was gone already")
        return f"Eviction of pod {pod} through the API ({self.eviction_api}: SIGTERM)"

    def leg_log(self, leg: int) -> str:
        pod = self.pod_of_leg.get(leg)
        if pod is None:
            return ""
        if self.node is not None:
            return self.node.pod_log(self.namespace, pod)
        with contextlib.suppress(ApiException):
            return str(self._core().read_namespaced_pod_log(pod, self.namespace))
        return ""

    def leg_ended(self, leg: int) -> dict[str, Any] | None:
        assert self.watch is not None
        pod = self.pod_of_leg.get(leg)
        if pod is None:
            return None
        if self.node is not None and self.node.exited_at(f"{self.namespace}/{pod}") is None:
            return None
        seen = self.watch.get(pod)
        if seen is None:
            return {"exit_code": None, "reason": "pod gone"} if pod in self.watch.gone else None
        status = seen.get("status") or {}
        for container in status.get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated is not None:
                reason = status.get("reason") or terminated.get("reason")
                return {"exit_code": terminated.get("exitCode"), "reason": reason, "message": terminated.get("message")}
        return None  # the kubelet has not reported it yet

    async def lose_node(self, fault: FaultRecord, leg: int, pid: int) -> None:
        if not hasattr(self.node, "lose_node"):
            raise DrillError("fault node-lost: the node harness cannot partition a node")
        node = cast(PartitionAccess, self.node)
        pod = self.pod_of_leg[leg]
        cut = time.time()
        how = await asyncio.to_thread(node.lose_node, self.namespace, pod)
        try:

            def fence_moved() -> tuple[int, float] | None:
                moved = fence_moved_at(self.layout)
                return moved if moved is not None and moved[0] > leg else None

            newer, moved_at = await self.wait_for("the next leg's fence", fence_moved, NODE_LOST_S + 60)
            key = f"{self.namespace}/{pod}"  # ended once the kubelet reaped it (an exit code to read)
            await self.wait_for("the cut-off trainer to end", lambda: node.exited_at(key) is not None, 60)
            fault.at_step = int(self.progress().get("step") or fault.at_step)
            code = node.exit_code(self.namespace, pod)
            start = node.spans.get(key, (0.0, None))[0]
            others = [s for k, (s, _) in node.spans.items() if k != key and s > start]
            fenced = FencedLeg(
                code, moved_at, newer, late_commits(self.layout, pid, moved_at, min(others, default=None))
            )
            self.fenced[pod] = fenced
        finally:
            healed = await asyncio.to_thread(node.restore_node)
        verdict = "fenced" if code == FENCED_EXIT else "NOT fenced"
        fault.detail = (
            f"leg {leg}: {how}; leg {newer}'s fence after {moved_at - cut:.1f}s (nodeLostAfterSeconds "
            f"{NODE_LOST_S:g}); old trainer exit {code} ({verdict}), "
            + (f"committed after the fence: {', '.join(fenced.late)}" if fenced.late else "no commit after the fence")
            + f"; {healed}"
        )
        if not fenced.ok:
            fault.detail += " [miss]"

    def check_legs_disjoint(self) -> Check:
        assert self.watch is not None
        prefix = f"{RUN_NAME}-leg-"
        spans: list[tuple[str, float | None, float | None]]
        if self.node is not None:
            node_prefix = f"{self.namespace}/{prefix}"
            spans = [(key.split("/", 1)[1], start, end) for key, (start, end) in self.node.spans.items()
                     if key.startswith(node_prefix)]  # fmt: skip
            name = "legs never overlapped (pod process start and end, from the kubelet)"
            if self.fenced:
                name = ("legs never overlapped, but for a cut-off leg that ended fenced (exit 76) with no checkpoint, "
                        "progress.json or history.jsonl record of its pid after the fence moved (pod process start "
                        "and end, from the kubelet)")  # fmt: skip
            return self.spans_disjoint(name, spans, self.fenced)
        spans = [(name, start, end) for name, (start, end) in self.watch.spans.items() if name.startswith(prefix)]
        return self.spans_disjoint("legs never overlapped (container start and finish, from the API)", spans)

    async def check_nothing_left(self) -> Check:
        """The run's Jobs are deleted when it ends and their pods follow (garbage collector); wait for both."""
        selector = f"{LABEL_RUN}={RUN_NAME}"
        batch: Any = kubernetes.client.BatchV1Api(self.kube)
        deadline = time.monotonic() + 60
        while True:
            jobs = await asyncio.to_thread(batch.list_namespaced_job, self.namespace, label_selector=selector)
            pods = await asyncio.to_thread(self._core().list_namespaced_pod, self.namespace, label_selector=selector)
            left = [f"Job {j.metadata.name}" for j in jobs.items] + [f"pod {p.metadata.name}" for p in pods.items]
            if self.node is not None:
                left += [f"process of {key}" for key in self.node.running() if key.startswith(f"{self.namespace}/")]
            hosts = (self.controller.pid,) if self.controller is not None else ()
            left += self.processes_on_volume(hosts)
            if not left or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        return Check("no Job, pod or process of the run left", not left, ", ".join(left) or "none")

    async def quarantine_events(self) -> str:
        events = await asyncio.to_thread(
            self._core().list_namespaced_event,
            self.namespace,
            field_selector=f"involvedObject.name={RUN_NAME},reason=CheckpointQuarantined",
        )
        return "\n".join(e.message or "" for e in events.items)

    async def published_phase(self) -> Check:
        """`kubectl get trainingruns` shows Succeeded (status is published right after the workflow ends)."""
        deadline = time.monotonic() + 30
        phase = None
        while time.monotonic() < deadline:
            run = await asyncio.to_thread(self._custom().get_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                          PLURAL, RUN_NAME)  # fmt: skip
            phase = (run.get("status") or {}).get("phase")
            if phase == "Succeeded":
                break
            await asyncio.sleep(0.5)
        return Check("TrainingRun object says Succeeded", phase == "Succeeded", f"status.phase {phase}")
