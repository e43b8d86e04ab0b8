"""Kubernetes benchmarks: preemption detection latency, and one controller process driving many concurrent runs.

`run(out)` adds `{"value", "unit", "target", "method"}` entries; `python -m bench.bench_kubernetes` prints them
as JSON. It starts its own real control plane (the envtest binaries: etcd, kube-apiserver, controller-manager,
scheduler), the process kubelet, the Temporal dev server, and `relay controller` as its own OS process through
`controller.kubernetes.main.main`. The control plane and kubelet are `relay_testing` (the test support the
cluster tests and the drill use, not shipped). Detection legs run its stand-in trainer
(`relay_testing/standin_trainer.py`); scale legs run `relay_testing/standin_leg.py`, the same stand-in training
until its level ends. Both write real checkpoints. The API server writes an audit log of the controller's own user
only, so the controller's requests are counted exactly. The cluster is sized so that it is not what limits the
controller: the node takes 2000 pods, and the controller-manager (the Job controller creating the pods) may send
200 requests/s instead of 20. Levels of 200 then 500 concurrent runs (RELAY_BENCH_K8S_LEVELS overrides), the next
tried only when every run of the previous one ran, advanced and succeeded, and the time left allows; about
8 minutes on 2 cores. Scratch files go to $RELAY_BENCH_DIR (default: the system temp folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from controller.kubernetes.server import evict_pod, server_features
from relay_testing.control_plane import (
    ControlPlane,
    die_with_parent,
    free_port,
    missing_binaries,
    write_kubeconfig,
)
from relay_testing.objects import install_crd, make_namespace
from relay_testing.process_kubelet import ProcessKubelet

REPO = Path(__file__).resolve().parents[1]
CONTROLLER_USER = "relay-controller"
CONTROLLER_MAIN = "import sys; from controller.kubernetes.main import main; sys.exit(main(sys.argv[1:]))"
LEVELS = tuple(
    int(n) for n in os.environ.get("RELAY_BENCH_K8S_LEVELS", "200,500").split(",")
)  # concurrent runs tried in turn while every run of the previous level progressed
# `relay controller` replicas sharing the load (RELAY_BENCH_K8S_REPLICAS; issue 16: 500 runs across 2): with more
# than one, each runs with --leader-elect (one leader runs the handlers, every replica's worker runs activities) and
# the figures get a `_<n>_replicas` suffix, so the one-controller figures stay as they are.
REPLICAS = int(os.environ.get("RELAY_BENCH_K8S_REPLICAS", "1"))
BUDGET_S = 660.0  # the whole benchmark, set-up included, stays under the 12 minutes
STANDIN_STEP_S = 3.0  # 500 legs at once: a step every 3 s each, a checkpoint every 5 steps
WINDOW_S = 60.0  # steady window with every run of a level running: two status intervals of the controller
FINISH_S = 150.0  # from the finish file to every run of a level Succeeded, at most
NODE_PODS = 2000
# The legs' processes run at this nice level: on a cluster they have nodes of their own, here they share 2 cores with
# the API server, etcd, Temporal and the controllers. 500 of them finishing at once (load average above 100) kept the
# API server from answering a Lease renewal within its 7 s deadline, a starvation no cluster's control plane sees.
POD_NICE = 10
# Lease timings of the replicas (seconds): the API server here answered a Lease request in 4-5 s while 500 legs
# started on the same 2 cores, past the defaults' 7 s renew deadline (10/7/2, which bench_ha's failover figure
# uses); a control plane that slow is given client-go's margin, scaled. `relay controller` takes the same flags.
LEASE_TIMINGS = ("--lease-duration", "30", "--renew-deadline", "20", "--retry-period", "2")
CONTROLLER_MANAGER_QPS = ["--kube-api-qps=200", "--kube-api-burst=400"]
AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
- level: Metadata
  users: ["{CONTROLLER_USER}"]
- level: None
"""


def entry(value: float, unit: str, target: str, method: str) -> dict[str, Any]:
    return {"value": round(float(value), 4), "unit": unit, "target": target, "method": method}


class AuditedControlPlane(ControlPlane):
    """The test tier's control plane plus a token for the controller's own user and an audit log of its requests."""

    controller_token: str = "relay-controller-bench-token"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"

    def _spawn(self, name: str, args: list[str]) -> None:
        if name == "kube-apiserver":
            with open(self.root / "tokens.csv", "a", encoding="utf-8") as tokens:
                tokens.write(f"{self.controller_token},{CONTROLLER_USER},{CONTROLLER_USER},system:masters\n")
            (self.root / "audit-policy.yaml").write_text(AUDIT_POLICY, encoding="utf-8")
            args = [
                *args,
                f"--audit-policy-file={self.root / 'audit-policy.yaml'}",
                f"--audit-log-path={self.audit_log}",
            ]
        if name == "kube-controller-manager":
            args = [*args, *CONTROLLER_MANAGER_QPS]
        super()._spawn(name, args)

    def audit_lines(self) -> int:
        if not self.audit_log.exists():
            return 0
        with open(self.audit_log, "rb") as handle:
            return sum(1 for _ in handle)


class JobWatcher:
    """Records when each Job is first seen (a watch, so the delay is the API server's fan-out, milliseconds)."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-watcher", daemon=True)

    def start(self) -> JobWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                for event in kubernetes.watch.Watch().stream(
                    self.batch.list_job_for_all_namespaces, timeout_seconds=5, deserialize=False
                ):
                    meta = event["object"]["metadata"]
                    self.first_seen.setdefault(f"{meta['namespace']}/{meta['name']}", time.time())
                    if self._stop.is_set():
                        return


class Bench:
    """Control plane, CRD, kubelet, Temporal and one controller process, for the whole benchmark."""

    def __init__(self, scratch: Path, namespaces: list[str]) -> None:
        from controller.devserver import DevServer

        self.scratch = scratch
        self.namespaces = namespaces
        self.volume = scratch / "volume"
        self.volume.mkdir()
        self.plane = AuditedControlPlane(scratch / "envtest")
        self.plane.root.mkdir()
        self.temporal = DevServer(f"127.0.0.1:{free_port()}", None, log_file=scratch / "temporal.log")
        self.kube: kubernetes.client.ApiClient | None = None
        self.kubelet: ProcessKubelet | None = None
        self.controllers: list[subprocess.Popen[bytes]] = []
        self.jobs: JobWatcher | None = None
        self._argv: list[str] = []
        self.restarts: list[str] = []  # why each replica restart happened (its last lease log line)
        self._retired_cpu_s = 0.0
        self._last_cpu_s: dict[int, float] = {}
        self._last_peak_mb: dict[int, float] = {}
        self._retired_peaks_mb: list[float] = []

    def start(self) -> Bench:
        from controller.snapshot import write_rows_file

        self.temporal.start()
        self.plane.start()
        self.kube = self.plane.api_client()
        install_crd(self.kube)
        for namespace in self.namespaces:
            make_namespace(self.kube, namespace)
        texts = [f"review {i} was {'great' if i % 2 else 'dull'}" for i in range(40)]
        for namespace in self.namespaces:  # a namespace reads only data/<namespace>/ (trainer.volume.tenancy)
            write_rows_file(self.volume / f"data/{namespace}/bench.csv", texts, [i % 2 for i in range(40)])
        self.kubelet = ProcessKubelet(
            self.plane.api_client(),
            self.volume,
            self.scratch / "kubelet",
            gpus=1000,
            module_map={"trainer": "relay_testing.standin_trainer"},
            pod_nice=POD_NICE,
        ).start()
        capacity = {"pods": str(NODE_PODS)}
        core = kubernetes.client.CoreV1Api(self.kube)
        core.patch_node_status(self.kubelet.node_name, {"status": {"capacity": capacity, "allocatable": capacity}})
        self.jobs = JobWatcher(self.plane.api_client()).start()
        kubeconfig = self.scratch / "controller.kubeconfig"
        write_kubeconfig(
            kubeconfig, self.plane.server, self.plane.controller_token, self.plane.ca_cert, CONTROLLER_USER
        )
        argv = [
            sys.executable, "-c", CONTROLLER_MAIN,
            "--temporal-address", self.temporal.address, "--volume-root", str(self.volume),
            "--task-queue", "bench-kubernetes", "--kubeconfig", str(kubeconfig),
            "--health-port", "0", "--metrics-port", "0",
        ]  # fmt: skip
        for namespace in self.namespaces:
            argv += ["--watch-namespace", namespace]
        # One replica holds the Lease too (--leader-elect is the default), so it gets the same timings: with the
        # defaults a lone controller lost its Lease while 200 legs started here, and exited as it should.
        argv += ["--leader-elect", "--leader-election-namespace", self.namespaces[0], *LEASE_TIMINGS]
        self._argv = argv
        for replica in range(REPLICAS):
            self.controllers.append(self._launch(replica))
        return self

    def _launch(self, replica: int) -> subprocess.Popen[bytes]:
        log = open(self.scratch / f"controller-{replica}.log", "ab")  # noqa: SIM115 - lives as long as the process
        env = {**os.environ, "RELAY_POD_NAME": f"relay-bench-{replica}"}
        return subprocess.Popen(
            self._argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, preexec_fn=die_with_parent
        )

    def stop(self) -> None:
        for controller in self.controllers:
            if controller.poll() is None:
                controller.send_signal(signal.SIGTERM)
        for controller in self.controllers:
            try:
                controller.wait(15)
            except subprocess.TimeoutExpired:
                controller.kill()
                controller.wait()
        if self.jobs is not None:
            self.jobs.stop()
        if self.kubelet is not None:
            self.kubelet.stop()
        self.plane.stop()
        self.temporal.stop()

    def peak_rss_per_replica_mb(self) -> list[float]:
        """VmHWM of each controller process, in replica order."""
        peaks = []
        for replica, controller in enumerate(self.controllers):
            lines = Path(f"/proc/{controller.pid}/status").read_text().splitlines()
            peaks += [int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")]
            self._last_peak_mb[replica] = peaks[-1] if peaks else 0.0
        if len(peaks) != len(self.controllers):
            raise RuntimeError("no VmHWM in /proc status")
        return peaks

    def peak_rss_mb(self) -> float:
        """The largest VmHWM of any controller process so far, restarted replicas' earlier ones included (as
        last sampled)."""
        return max([*self.peak_rss_per_replica_mb(), *self._retired_peaks_mb])

    def controller_cpu_s(self) -> float:
        """CPU seconds (user + system) the controller processes have used so far, together (a restarted replica's
        earlier processes counted as last sampled)."""
        total = self._retired_cpu_s
        for replica, controller in enumerate(self.controllers):
            try:
                fields = Path(f"/proc/{controller.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                total += self._last_cpu_s.get(replica, 0.0)
                continue
            self._last_cpu_s[replica] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            total += self._last_cpu_s[replica]
        return total

    def assert_controller_alive(self) -> None:
        """One replica: its exit fails the benchmark. Several: an exited replica is started again, as its
        Deployment's restart policy would (a leader that lost its Lease exits on purpose), and counted."""
        for replica, controller in enumerate(self.controllers):
            if controller.poll() is None:
                continue
            tail = (self.scratch / f"controller-{replica}.log").read_text(errors="replace")[-2000:]
            if REPLICAS == 1:
                raise RuntimeError(f"controller replica {replica} exited with {controller.returncode}:\n{tail}")
            reason = next(
                (line for line in reversed(tail.splitlines()) if "lease" in line), f"exit {controller.returncode}"
            )
            print(f"controller replica {replica} exited ({reason.strip()}); restarting it", flush=True)
            self.restarts.append(reason.strip())
            self.controller_cpu_s()  # its last sample stays in _last_cpu_s
            self._retired_cpu_s += self._last_cpu_s.pop(replica, 0.0)
            self._retired_peaks_mb.append(self._last_peak_mb.get(replica, 0.0))
            self.controllers[replica] = self._launch(replica)

    # ------------------------------------------------------------ cluster helpers

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.kube)

    def apply(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": "relay.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name}, "spec": spec}
        self.custom.create_namespaced_custom_object("relay.dev", "v1alpha1", namespace, "trainingruns", body)

    def statuses(self, namespace: str) -> dict[str, dict[str, Any]]:
        items = self.custom.list_namespaced_custom_object("relay.dev", "v1alpha1", namespace, "trainingruns")["items"]
        return {item["metadata"]["name"]: item.get("status") or {} for item in items}

    def pod_of(self, namespace: str, job: str) -> str | None:
        pods = kubernetes.client.CoreV1Api(self.kube).list_namespaced_pod(namespace, label_selector=f"job-name={job}")
        return pods.items[0].metadata.name if pods.items else None


def until(check: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(ApiException):
            value = check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(interval_s)


def run_spec(namespace: str, max_steps: int) -> dict[str, Any]:
    return {
        "dataset": {"source": "csv", "path": f"data/{namespace}/bench.csv"},
        "training": {"maxSteps": max_steps, "checkpointEverySteps": 5},
        "resources": {"cpu": "100m", "memory": "64Mi", "gpus": 1},
        "terminationGracePeriodSeconds": 5,
        "retries": {"backoffSeconds": 0.5, "maxPreemptions": 100},
    }


# ---------------------------------------------------------------- detection latency


def detection_latency(bench: Bench, namespace: str, evictions: int = 7) -> dict[str, Any]:
    """Evict the running leg's pod `evictions` times; each time, time from its process exit to the next Job."""
    assert bench.kubelet is not None and bench.jobs is not None
    bench.kubelet.extra_env["RELAY_STANDIN_STEP_S"] = "0.05"
    bench.kubelet.extra_env["RELAY_STANDIN_STEPS"] = "100000"
    assert bench.kube is not None
    policy = f"policy/{server_features(bench.kube).policy_version}"
    name = "detect"
    bench.apply(namespace, name, run_spec(namespace, 100_000))
    latencies = []
    for leg in range(evictions):
        job = f"{name}-leg-{leg}"
        pod = until(lambda job=job: bench.pod_of(namespace, job), 120, f"no pod for {job}", 0.1)
        until(lambda pod=pod: f"{namespace}/{pod}" in bench.kubelet.running(), 60, f"{pod} never ran")  # type: ignore[union-attr]
        time.sleep(0.5)  # a little training, as a real preemption finds it
        bench.assert_controller_alive()
        evict_pod(bench.kube, namespace, pod)
        nxt = f"{namespace}/{name}-leg-{leg + 1}"
        until(lambda nxt=nxt: nxt in bench.jobs.first_seen, 60, f"{nxt} never created")  # type: ignore[union-attr]
        exited = until(lambda pod=pod: bench.kubelet.exited_at(f"{namespace}/{pod}"), 10, "no exit time")  # type: ignore[union-attr]
        latencies.append(bench.jobs.first_seen[nxt] - exited)
    bench.custom.patch_namespaced_custom_object(
        "relay.dev", "v1alpha1", namespace, "trainingruns", name, {"spec": {"suspend": True}}
    )  # out of the way of the scale test
    median = statistics.median(latencies)
    return entry(
        median,
        "s",
        "<= 2 s median",
        f"median over {len(latencies)} legs (min {min(latencies):.2f}, max {max(latencies):.2f} s): a running "
        f"stand-in leg's pod evicted ({policy} Eviction), time from its process exit (SIGTERM -> checkpoint "
        "-> exit 75, seen by the process kubelet) to the next leg's Job first seen by a watch",
    )


# ---------------------------------------------------------------- scale


def _progress(status: dict[str, Any]) -> tuple[int, int]:
    """(published step, newest checkpoint's step) of a TrainingRun's .status."""
    checkpoint = status.get("latestCheckpoint") or {}
    return int(status.get("step") or 0), int(checkpoint.get("step") or 0)


def drive(bench: Bench, namespace: str, count: int, ramp_budget_s: float) -> dict[str, Any]:
    """`count` runs applied at once; their legs train until the level's finish file appears.

    Three phases: ramp (until every run has a running leg pod and its .status says Running), a steady window
    of WINDOW_S with all `count` legs alive (every run's published step and newest checkpoint must advance in
    it; the controller's API requests are counted over it), then the finish file ends every leg and every run
    must reach Succeeded.
    """
    assert bench.kubelet is not None
    kubelet = bench.kubelet
    finish = bench.scratch / f"finish-{namespace}"
    kubelet.module_map["trainer"] = "relay_testing.standin_leg"
    kubelet.extra_env["RELAY_STANDIN_STEP_S"] = str(STANDIN_STEP_S)
    kubelet.extra_env["RELAY_STANDIN_FINISH_FILE"] = str(finish)
    names = [f"run-{i:03d}" for i in range(count)]
    result: dict[str, Any] = {"count": count, "all_running": False, "window_progressed": 0}

    def running() -> int:
        return len([p for p in kubelet.running() if p.startswith(f"{namespace}/")])

    started = time.monotonic()
    for name in names:
        bench.apply(namespace, name, run_spec(namespace, 100_000))
    result["apply_s"] = time.monotonic() - started
    max_running, next_status = 0, 0.0
    while time.monotonic() - started < ramp_budget_s:
        bench.assert_controller_alive()
        now = time.monotonic()
        max_running = max(max_running, running())
        if max_running == count and now >= next_status:  # listing every TrainingRun is the dear check: 2 s apart
            next_status = now + 2.0
            phases = [s.get("phase") for s in bench.statuses(namespace).values()]
            if phases.count("Running") == count:
                result["all_running"] = True
                break
        time.sleep(0.5)
    result["ramp_s"] = time.monotonic() - started
    result["max_running_pods"] = max_running
    # The window runs even when the ramp fell short, so the report says how far the level got.
    before = {n: _progress(s) for n, s in bench.statuses(namespace).items()}
    requests_before = bench.plane.audit_lines()
    cpu_before = bench.controller_cpu_s()
    window_start = time.monotonic()
    min_running = count
    while time.monotonic() - window_start < WINDOW_S:
        bench.assert_controller_alive()
        min_running = min(min_running, running())
        time.sleep(1.0)
    requests = bench.plane.audit_lines() - requests_before
    window_min = (time.monotonic() - window_start) / 60
    result["window_controller_cpu"] = (bench.controller_cpu_s() - cpu_before) / (window_min * 60)
    result["window_load_1m"] = os.getloadavg()[0]
    after = {n: _progress(s) for n, s in bench.statuses(namespace).items()}
    zero = (0, 0)
    result["window_progressed"] = sum(
        1 for n in names if all(a > b for a, b in zip(after.get(n, zero), before.get(n, zero), strict=True))
    )
    result["window_min_running_pods"] = min_running
    result["requests_per_run_per_min"] = requests / count / window_min

    finish.touch()
    finishing = time.monotonic()
    succeeded = 0
    while time.monotonic() - finishing < FINISH_S:
        bench.assert_controller_alive()
        succeeded = sum(1 for s in bench.statuses(namespace).values() if s.get("phase") == "Succeeded")
        if succeeded == count:
            break
        time.sleep(2.0)
    result["succeeded"] = succeeded
    result["finish_s"] = time.monotonic() - finishing
    return result


def _level_ok(level: dict[str, Any]) -> bool:
    count = level["count"]
    return bool(level["all_running"]) and level["window_progressed"] == count and level["succeeded"] == count


def run(out: dict[str, Any]) -> None:
    missing = missing_binaries()
    if missing:
        raise RuntimeError(f"envtest binaries missing ({', '.join(missing)}): run `make envtest`")
    began = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-k8s-", dir=os.environ.get("RELAY_BENCH_DIR")))
    namespaces = ["detect", *(f"scale-{n}" for n in LEVELS)]
    bench = Bench(scratch, namespaces)
    levels: list[dict[str, Any]] = []
    rate = 3.0  # runs brought to a running leg per second: a first guess, then what the last level measured
    try:
        bench.start()
        detection_key = "detection_latency_s" + (f"_{REPLICAS}_replicas" if REPLICAS > 1 else "")
        out[detection_key] = detection_latency(bench, "detect")
        print(json.dumps({detection_key: out[detection_key]}), flush=True)
        for count in LEVELS:
            ramp_budget = count / rate + 60
            needed = ramp_budget + WINDOW_S + FINISH_S
            if BUDGET_S - (time.monotonic() - began) < needed:
                print(f"skipping {count} runs: up to {needed:.0f} s needed, over the budget", flush=True)
                break
            level = drive(bench, f"scale-{count}", count, ramp_budget)
            level["peak_rss_mb"] = bench.peak_rss_mb()
            level["peak_rss_per_replica_mb"] = bench.peak_rss_per_replica_mb()
            print(json.dumps(level), flush=True)
            levels.append(level)
            if not _level_ok(level):
                break
            # A bigger level starts more slowly per run (the running ones load the machine): plan with 60%.
            rate = min(rate, 0.6 * count / level["ramp_s"])
        peak = bench.peak_rss_mb()
        peaks = bench.peak_rss_per_replica_mb()
    finally:
        bench.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    good = [lv for lv in levels if _level_ok(lv)]
    best = good[-1] if good else None
    tried = "; ".join(
        f"{lv['count']} applied in {lv['apply_s']:.0f} s: {lv['max_running_pods']} legs running at once and every "
        f".status Running after {lv['ramp_s']:.0f} s ({lv['count'] / lv['ramp_s']:.1f} runs/s), "
        f"{lv['window_progressed']} advanced published step and checkpoint in the {WINDOW_S:.0f} s window "
        f"(controller CPU {lv['window_controller_cpu']:.0%} of a core, "
        f"{lv['requests_per_run_per_min']:.1f} API requests/run/min, load average {lv['window_load_1m']:.1f}), "
        f"{lv['succeeded']} Succeeded {lv['finish_s']:.0f} s after the finish, VmHWM {lv['peak_rss_mb']:.0f} MB"
        for lv in levels
    )
    restarts = (
        f" Replica restarts (each as its Deployment would restart it): {len(bench.restarts)}"
        + (f" ({'; '.join(bench.restarts)})" if bench.restarts else "")
        + "."
        if REPLICAS > 1
        else ""
    )
    untried = [n for n in LEVELS if n not in [lv["count"] for lv in levels]]
    suffix = f"_{REPLICAS}_replicas" if REPLICAS > 1 else ""
    who = (
        f"{REPLICAS} `relay controller` processes (--leader-elect {' '.join(LEASE_TIMINGS)}: one leader runs the "
        "handlers, every replica's worker runs activities)"
        if REPLICAS > 1
        else f"one `relay controller` process (--leader-elect {' '.join(LEASE_TIMINGS)})"
    )
    out[f"controller_concurrent_runs{suffix}"] = entry(
        best["count"] if best else 0,
        "runs",
        "500 (every run progresses)",
        f"{who} (main(), default flags: .status progress every 30 s) on the envtest API "
        "server + Temporal dev server; a level applies N TrainingRuns at once, their legs the bench stand-in "
        f"(relay_testing/standin_leg.py: {STANDIN_STEP_S:g} s steps, a real checkpoint every 5) on the process "
        f"kubelet at nice {POD_NICE} (on a cluster they run on other nodes), training until the level ends; "
        f"levels: {tried}. The largest level where every run ran at once, "
        "advanced, and succeeded is reported"
        + (f"; not tried: {', '.join(map(str, untried))}" if untried else "")
        + ". Load averages are of this shared 2-core machine, other work included."
        + restarts,
    )
    out[f"controller_peak_rss_mb{suffix}"] = entry(
        peak,
        "MB",
        "<= 500 MB" + (" per replica" if REPLICAS > 1 else ""),
        f"VmHWM of the controller process (/proc/PID/status) after driving up to "
        f"{levels[-1]['count'] if levels else 0} concurrent runs (plus the detection run)"
        + (f"; the largest of the replicas' ({', '.join(f'{mb:.0f}' for mb in peaks)} MB)" if REPLICAS > 1 else ""),
    )
    if best is not None:
        out[f"controller_api_requests_per_run_min{suffix}"] = entry(
            best["requests_per_run_per_min"],
            "requests/run/min",
            "reported",
            f"the controller's own API requests (API server audit log of its user, ResponseComplete) over the "
            f"{WINDOW_S:.0f} s steady window with all {best['count']} legs running, per run per minute",
        )


if __name__ == "__main__":
    results: dict[str, Any] = {}
    run(results)
    print(json.dumps(results, indent=2))
