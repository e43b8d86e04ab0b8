"""A process kubelet for tests and drills: one Node whose pods run as local child processes.

It registers a Ready Node with cpu, memory and `nvidia.com/gpu` capacity, watches the pods the scheduler
binds to it, runs each pod's first container command locally (PVC mounts mapped to a local folder by
rewriting the mount paths in the command and env; emptyDirs to per-pod temp folders; `python` to this
interpreter), and reports phase, container state and exit code through `pods/status`, as a kubelet does.
A pod marked for deletion (kubectl delete, the Eviction API, the garbage collector) gets SIGTERM, then
SIGKILL after its grace period, then is removed. `pressure_evict()` plays the kubelet's own node-pressure
eviction (phase Failed, reason Evicted). `partition()` plays a node the API server can no longer reach
(issue 13): its pods' processes keep running and writing the volume, but the kubelet reports nothing more
and hears of no deletion; `set_ready()` sets the Node's Ready condition as the node controller would see it.
`spans` keeps every pod's process start and end time, so a drill
can check that no two legs of a run ever ran at once. The container mode (relay_testing/container_kubelet.py)
is this class with `_launch`, `_kill`, `_terminate` and `_exit_reason` run through a Docker engine instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import kubernetes
from kubernetes.client.rest import ApiException

from relay_testing.control_plane import REPO_ROOT, die_with_parent


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _under(value: str, folder: str) -> bool:
    """Whether path `value` is `folder` or inside it, compared whole component by whole component."""
    folder = folder.rstrip("/") or "/"
    return value == folder or value.startswith(folder if folder == "/" else folder + "/")


def rewrite_path(value: str, mapping: list[tuple[str, str]], host_roots: list[str]) -> str:
    """`value` with the pod's mount path it lies under swapped for that mount's local folder.

    `mapping` is (mount path, local folder) pairs. A mount path matches at a component boundary only (`/data`
    is not a prefix of `/database`), and the most specific mount wins. A host root (the checkout, the venv: a
    process pod's image) counts as a mount of itself, so a host path under a mount path stays as it is when a
    host root is the more specific match: with the chart's emptyDir at `/tmp`, a clone under `/tmp` keeps its
    `/tmp/<clone>/.venv/bin/relay` (rewriting it gave "volumes/tmp/...: not found" and a crash-looping pod).
    """
    candidates = [(mount, local) for mount, local in mapping if _under(value, mount)]
    candidates += [(root, root) for root in host_roots if _under(value, root)]
    if not candidates:
        return value
    mount, local = max(candidates, key=lambda pair: len(pair[0].rstrip("/")))
    return local + value[len(mount.rstrip("/")) :]


def probe_passes(probe: dict[str, Any], container: dict[str, Any]) -> bool:
    """One httpGet (2xx/3xx) or tcpSocket probe against this host, as a kubelet probes the pod IP; a named port
    is looked up in the container's ports. Other probe kinds (exec, grpc) count as passing."""
    action = probe.get("httpGet") or probe.get("tcpSocket")
    if action is None:
        return True
    port = action.get("port")
    if isinstance(port, str) and not port.isdigit():
        port = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)
        if port is None:
            return False
    host = action.get("host") or "127.0.0.1"
    timeout_s = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            scheme = str(action.get("scheme", "HTTP")).lower()
            url = f"{scheme}://{host}:{int(port)}{action.get('path', '/')}"
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return 200 <= response.status < 400
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):  # refused, timed out, or an HTTP error status (HTTPError is an OSError)
        return False


@dataclass
class LocalPod:
    namespace: str
    name: str
    uid: str
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    kill_timer: threading.Timer | None = None
    terminating: bool = False
    reported: bool = False
    extra_status: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0  # the container's restartCount (restartPolicy Always/OnFailure restarts it in place)
    last_state: dict[str, Any] = field(default_factory=dict)  # the previous run's `terminated`, as lastState
    exited: bool = False  # the current process has ended (set under the kubelet's lock)


class ProcessKubelet:
    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        volume_root: Path,
        work_root: Path,
        node_name: str = "relay-gpu-node",
        gpus: int = 4,
        start_delay_s: float = 0.2,
        extra_env: dict[str, str] | None = None,
        module_map: dict[str, str] | None = None,
        restart_backoff_s: float = 10.0,
        pod_nice: int = 0,
    ) -> None:
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.volume_root = volume_root
        self.work_root = work_root
        self.node_name = node_name
        self.gpus = gpus
        self.start_delay_s = start_delay_s
        self.extra_env = extra_env or {}
        # `python -m X` -> `python -m module_map[X]` (tests swap the trainer for relay_testing.standin_trainer).
        self.module_map = module_map or {}
        # A kubelet's crash-loop back-off: 10 s, doubling per restart, at most 300 s (tests pass less).
        self.restart_backoff_s = restart_backoff_s
        # Nice level of the pods' processes. On a cluster they run on nodes of their own; the benchmarks that start
        # hundreds of them on the machine of the control plane lower them so as not to starve it, which no real
        # cluster's API server suffers from its workloads.
        self.pod_nice = pod_nice
        self.pods: dict[str, LocalPod] = {}  # by uid
        # "<ns>/<name>" -> its process's (start, end) time.time(), end None while it runs; in start order.
        self.spans: dict[str, tuple[float, float | None]] = {}
        self.volume_for_namespace: dict[str, Path] = {}  # PVC mounts of these namespaces map here instead
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.partitioned = False  # partition(): cut off from the API server, the pods' processes run on
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ node

    def register_node(self) -> None:
        capacity = {"cpu": "64", "memory": "256Gi", "pods": "500", "nvidia.com/gpu": str(self.gpus)}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": {"kubernetes.io/hostname": self.node_name}},
        }
        with contextlib.suppress(ApiException):
            self.core.create_node(node)  # type: ignore[arg-type]  # the client takes plain dicts
        status = {
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "process kubelet ready",
                        "lastHeartbeatTime": _now(),
                        "lastTransitionTime": _now(),
                    }
                ],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            }
        }
        self.core.patch_node_status(self.node_name, status)
        # The TaintNodesByCondition admission plugin adds not-ready:NoSchedule on create; the node lifecycle
        # controller (not run here) would lift it once Ready, so the harness does.
        self.core.patch_node(self.node_name, {"spec": {"taints": None}})

    def set_ready(self, status: str, reason: str = "KubeletReady") -> None:
        """Set the Node's Ready condition ("True", "False", "Unknown"), transition time now."""
        condition = {
            "type": "Ready",
            "status": status,
            "reason": reason,
            "message": f"process kubelet: Ready={status}",
            "lastHeartbeatTime": _now(),
            "lastTransitionTime": _now(),
        }
        self.core.patch_node_status(self.node_name, {"status": {"conditions": [condition]}})

    def set_unschedulable(self, unschedulable: bool) -> None:
        """Cordon (True) or uncordon the Node, as `kubectl cordon` does."""
        self.core.patch_node(self.node_name, {"spec": {"unschedulable": unschedulable or None}})

    def partition(self) -> None:
        """From now on the node is unreachable: no status reports, no deletions heard; processes keep running."""
        with self._lock:
            self.partitioned = True

    def start(self) -> ProcessKubelet:
        self.register_node()
        self._thread = threading.Thread(target=self._watch_loop, name="process-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            pods = list(self.pods.values())
        for pod in pods:
            if pod.process and pod.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.process.pid, signal.SIGKILL)
                pod.process.wait()

    # ------------------------------------------------------------ watch

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            watcher = kubernetes.watch.Watch()
            try:
                for event in watcher.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={self.node_name}",
                    timeout_seconds=5,
                    deserialize=False,
                ):
                    if self._stop.is_set():
                        watcher.stop()
                        break
                    self._handle(event["type"], event["object"])
            except Exception as exc:
                if not self._stop.is_set():
                    print(f"process-kubelet: watch error {exc!r}", file=sys.stderr)
                    time.sleep(0.5)

    def _handle(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        uid = meta["uid"]
        with self._lock:
            if self.partitioned:
                return
            pod = self.pods.get(uid)
            if kind == "DELETED":
                if pod is not None:
                    self._kill(pod, signal.SIGKILL)
                return
            if pod is None:
                if obj.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    return
                pod = LocalPod(meta["namespace"], meta["name"], uid, self.work_root / uid)
                self.pods[uid] = pod
                threading.Thread(target=self._run, args=(pod, obj), daemon=True).start()
                return
        if meta.get("deletionTimestamp") and not pod.terminating:
            self._begin_termination(pod, int(meta.get("deletionGracePeriodSeconds") or 0))

    # ------------------------------------------------------------ running a pod

    def _mounts(self, obj: dict[str, Any], pod: LocalPod) -> list[tuple[str, str]]:
        volumes = {v["name"]: v for v in obj["spec"].get("volumes", [])}
        mapping = []
        container = obj["spec"]["containers"][0]
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            if "persistentVolumeClaim" in volume:
                root = self.volume_for_namespace.get(pod.namespace, self.volume_root)
                local = root / mount.get("subPath", "")
            else:
                local = pod.workdir / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            mapping.append((mount["mountPath"].rstrip("/"), str(local)))
        return sorted(mapping, key=lambda pair: -len(pair[0]))

    def _rewrite(self, value: str, mapping: list[tuple[str, str]]) -> str:
        return rewrite_path(value, mapping, self.host_roots())

    def host_roots(self) -> list[str]:
        """The host folders a pod's process sees as they are: in process mode they are the image's files (this
        checkout, this interpreter's environment) and the harness's own folders."""
        roots = [REPO_ROOT, Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).parent, self.work_root]
        roots += [self.volume_root, *self.volume_for_namespace.values()]
        return [str(root) for root in roots]

    def _run(self, pod: LocalPod, obj: dict[str, Any]) -> None:
        pod.workdir.mkdir(parents=True, exist_ok=True)
        time.sleep(self.start_delay_s)  # container creation
        key = f"{pod.namespace}/{pod.name}"
        container = obj["spec"]["containers"][0]
        while True:
            with self._lock:
                if pod.terminating or self._stop.is_set():
                    self._finish(pod, None, obj)
                    return
                # closed when the process ends; a restart appends, as `kubectl logs --previous` keeps the last run
                log = open(pod.workdir / "container.log", "ab" if pod.restarts else "wb")  # noqa: SIM115
                process = pod.process = self._launch(pod, obj, log)
                pod.exited = False
                pod.started_at = _now()
                self.spans[key] = (time.time(), None)
            # A container with a readiness probe is not Ready until the probe passes (the chart's /readyz), so a
            # controller that exits at once never counts as available and `kubectl rollout status` cannot pass.
            probed = "readinessProbe" in container
            self._patch_status(pod, self._running_status(obj, pod, ready=not probed))
            if probed:
                threading.Thread(target=self._probe_readiness, args=(pod, obj, process), daemon=True).start()
            code = process.wait()
            with self._lock:
                pod.exited = True
                self.spans[key] = (self.spans[key][0], time.time())
            log.close()
            if not self._restarts(obj, code) or pod.terminating or self._stop.is_set():
                self._finish(pod, code, obj)
                return
            self._back_off(pod, obj, code)

    def _running_status(self, obj: dict[str, Any], pod: LocalPod, ready: bool) -> dict[str, Any]:
        flag = "True" if ready else "False"
        return {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": pod.started_at,
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": pod.started_at},
                {"type": "Ready", "status": flag, "lastTransitionTime": pod.started_at},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": pod.started_at},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": pod.started_at},
            ],
            "containerStatuses": [
                self._container_status(obj, {"running": {"startedAt": pod.started_at}}, pod=pod, ready=ready)
            ],
        }

    @staticmethod
    def _restarts(obj: dict[str, Any], code: int) -> bool:
        """Whether a kubelet restarts the container in place: restartPolicy Always (a Deployment's), or
        OnFailure after a failure. A Job's pods (Never) end, and their phase says how."""
        policy = obj["spec"].get("restartPolicy", "Always")
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    def _back_off(self, pod: LocalPod, obj: dict[str, Any], code: int) -> None:
        """A kubelet's crash loop: not Ready, waiting CrashLoopBackOff with the last exit in lastState, then a
        restart after 10 s, 20 s, ... (at most 300 s). The phase stays Running, so the ReplicaSet does not
        replace the pod (replacing it made ~110 pods in 35 s)."""
        exit_code = 128 - code if code < 0 else code
        pod.last_state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": self._exit_reason(pod, exit_code),
                "startedAt": pod.started_at,
                "finishedAt": _now(),
            }
        }
        pod.restarts += 1
        delay = min(self.restart_backoff_s * 2 ** (pod.restarts - 1), 300.0)
        container = obj["spec"]["containers"][0]
        waiting = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {delay:g}s restarting failed container={container['name']} pod={pod.name}",
            }
        }
        status = self._running_status(obj, pod, ready=False)
        status["containerStatuses"] = [self._container_status(obj, waiting, pod=pod)]
        self._patch_status(pod, status)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not (pod.terminating or self._stop.is_set()):
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
        self._before_restart(pod)

    def _before_restart(self, pod: LocalPod) -> None:
        """Clear what the ended run leaves behind before the same pod's container starts again (the container
        mode removes the exited container, whose name the next `docker run` reuses)."""

    def _probe_readiness(self, pod: LocalPod, obj: dict[str, Any], process: subprocess.Popen[bytes]) -> None:
        """Run the container's readinessProbe (httpGet or tcpSocket) until it passes, then mark the pod Ready.
        The probe runs every periodSeconds, at most every second here, so tests do not wait out a period."""
        container = obj["spec"]["containers"][0]
        probe = container["readinessProbe"]
        period = min(float(probe.get("periodSeconds", 10)), 1.0)
        time.sleep(float(probe.get("initialDelaySeconds", 0)))
        while not (pod.terminating or self._stop.is_set() or pod.exited):
            if probe_passes(probe, container):
                with self._lock:  # the exit status is patched after `exited` is set under this lock
                    if pod.process is process and not pod.exited and not pod.terminating:
                        self._patch_status(pod, self._running_status(obj, pod, ready=True))
                return
            time.sleep(period)

    def _launch(self, pod: LocalPod, obj: dict[str, Any], log: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start the pod's first container as a local process writing `log` (the container mode overrides this)."""
        container = obj["spec"]["containers"][0]
        mapping = self._mounts(obj, pod)
        # The kubelet mounts an empty file at terminationMessagePath; here it is the pod's own file, and the
        # path is rewritten wherever the command or env names it (as the Job's RELAY_TERMINATION_LOG does).
        termination_log = pod.workdir / "termination-log"
        termination_log.write_bytes(b"")
        mapping.append((container.get("terminationMessagePath") or "/dev/termination-log", str(termination_log)))
        argv = [self._rewrite(a, mapping) for a in [*container.get("command", []), *container.get("args", [])]]
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable
            if len(argv) > 2 and argv[1] == "-m" and argv[2] in self.module_map:
                argv[2] = self.module_map[argv[2]]
        env = dict(os.environ)
        env.update(self.extra_env)
        # A pod runs in its own folder, so the stand-ins (`python -m relay_testing.standin_trainer`) are found
        # through the path of the checkout they come from, which is not an installed package.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        for item in container.get("env", []):
            env[item["name"]] = self._rewrite(str(item.get("value", "")), mapping)
        return subprocess.Popen(
            argv,
            cwd=pod.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self._preexec,
        )

    def _preexec(self) -> None:
        """In the pod's process before it starts: its nice level, and death with the thread that waits for it."""
        if self.pod_nice:
            os.nice(self.pod_nice)
        die_with_parent()  # this thread waits for the process, so it outlives it

    @staticmethod
    def _container_status(
        obj: dict[str, Any], state: dict[str, Any], pod: LocalPod | None = None, ready: bool | None = None
    ) -> dict[str, Any]:
        container = obj["spec"]["containers"][0]
        status = {
            "name": container["name"],
            "image": container["image"],
            "imageID": f"docker-pullable://{container['image']}",
            "ready": "running" in state if ready is None else ready,
            "restartCount": pod.restarts if pod else 0,
            "started": "running" in state,
            "state": state,
        }
        if pod and pod.last_state:
            status["lastState"] = pod.last_state
        return status

    def _finish(self, pod: LocalPod, code: int | None, obj: dict[str, Any]) -> None:
        with self._lock:
            if pod.kill_timer:
                pod.kill_timer.cancel()
            if pod.reported:
                return
            pod.reported = True
        if code is not None:
            exit_code = 128 - code if code < 0 else code  # killed by signal N: 128+N, as a runtime reports
            terminated = {
                "exitCode": exit_code,
                "reason": self._exit_reason(pod, exit_code),
                "startedAt": pod.started_at,
                "finishedAt": _now(),
            }
            message = self._termination_message(pod, obj, exit_code)
            if message:
                terminated["message"] = message
            status = {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": _now()}],
                "containerStatuses": [self._container_status(obj, {"terminated": terminated}, pod=pod)],
                **pod.extra_status,
            }
            self._patch_status(pod, status)
        if pod.terminating:
            with contextlib.suppress(ApiException):
                self._remove(pod)
        shutil.rmtree(pod.workdir / "volumes", ignore_errors=True)

    def _exit_reason(self, pod: LocalPod, exit_code: int) -> str:
        """The terminated state's reason a runtime gives (the container mode adds OOMKilled)."""
        return "Completed" if exit_code == 0 else "Error"

    @staticmethod
    def _termination_message(pod: LocalPod, obj: dict[str, Any], exit_code: int) -> str:
        """What a kubelet reports as `terminated.message`: the termination-message file (4096 bytes at most);
        when it is empty, a failed container with FallbackToLogsOnError gets its log's last 80 lines / 2048 bytes.
        """
        with contextlib.suppress(OSError):
            with open(pod.workdir / "termination-log", "rb") as handle:
                message = handle.read(4096).decode("utf-8", "replace")
            if message.strip():
                return message
        policy = obj["spec"]["containers"][0].get("terminationMessagePolicy")
        if exit_code == 0 or policy != "FallbackToLogsOnError":
            return ""
        with contextlib.suppress(OSError):
            tail = (pod.workdir / "container.log").read_bytes()[-2048:].decode("utf-8", "replace")
            return "\n".join(tail.splitlines()[-80:])
        return ""

    def _remove(self, pod: LocalPod) -> None:
        """The kubelet's final delete (grace 0, this pod's uid only); the grace period goes in the body."""
        if self.partitioned:
            return
        with contextlib.suppress(Exception):  # gone already, or the control plane is shutting down
            body: Any = {"gracePeriodSeconds": 0, "preconditions": {"uid": pod.uid}}
            self.core.delete_namespaced_pod(pod.name, pod.namespace, body=body)

    def _patch_status(self, pod: LocalPod, status: dict[str, Any]) -> None:
        if self.partitioned:
            return
        with contextlib.suppress(Exception):
            self.core.patch_namespaced_pod_status(pod.name, pod.namespace, {"status": status})

    # ------------------------------------------------------------ termination

    def _kill(self, pod: LocalPod, sig: signal.Signals) -> None:
        if pod.process is not None and pod.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.process.pid, sig)

    def _begin_termination(self, pod: LocalPod, grace_s: int) -> None:
        with self._lock:
            pod.terminating = True
            if pod.process is None:
                pass  # _run sees `terminating` and reports without starting
            elif pod.process.poll() is None:
                self._terminate(pod, grace_s)
                return
        # Already ended (or never started): remove the object now.
        with contextlib.suppress(ApiException):
            self._remove(pod)

    def _terminate(self, pod: LocalPod, grace_s: int) -> None:
        """SIGTERM now, SIGKILL after the grace period (the container mode runs `docker stop -t`)."""
        self._kill(pod, signal.SIGTERM)
        pod.kill_timer = threading.Timer(grace_s, self._kill, args=(pod, signal.SIGKILL))
        pod.kill_timer.daemon = True
        pod.kill_timer.start()

    def pressure_evict(self, namespace: str, name: str, message: str = "The node was low on resource: memory.") -> None:
        """What a kubelet under memory pressure does: kill the container, mark the pod Failed/Evicted."""
        with self._lock:
            pod = next(p for p in self.pods.values() if (p.namespace, p.name) == (namespace, name))
            pod.extra_status = {"reason": "Evicted", "message": message}
            self._kill(pod, signal.SIGKILL)

    @property
    def started(self) -> list[str]:
        """ "<ns>/<name>" of every pod whose process started, in start order."""
        return list(self.spans)

    def exited_at(self, key: str) -> float | None:
        """When the process of pod "<ns>/<name>" ended (time.time()), or None while it runs or never ran."""
        return self.spans.get(key, (0.0, None))[1]

    def pid_of(self, namespace: str, name: str) -> int | None:
        """The local pid of a running pod's container process."""
        with self._lock:
            for pod in self.pods.values():
                if (pod.namespace, pod.name) == (namespace, name) and pod.process and pod.process.poll() is None:
                    return pod.process.pid
        return None

    def running(self) -> list[str]:
        with self._lock:
            return [f"{p.namespace}/{p.name}" for p in self.pods.values() if p.process and p.process.poll() is None]

    def pod_log(self, namespace: str, name: str) -> str:
        with self._lock:
            pod = next(p for p in self.pods.values() if (p.namespace, p.name) == (namespace, name))
        path = pod.workdir / "container.log"
        return path.read_text(errors="replace") if path.exists() else ""
