"""`relay controller` replicas as OS processes against one API server and Temporal, and the Lease they share.

Used by the high-availability tests and bench/bench_ha.py: start a replica (its log in a file), see which one
holds the handlers' Lease, SIGTERM or SIGKILL one, and wait for a condition while naming every replica's log
when it never comes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import kubernetes

from relay_testing.control_plane import free_port

REPO = Path(__file__).resolve().parents[1]
LEASE = "relay-controller"


def controller_args(
    temporal_address: str, kubeconfig: Path, namespace: str, volume_root: Path, task_queue: str
) -> list[str]:
    """The flags of a replica watching one namespace (its Lease lives there too)."""
    return [
        "--temporal-address", temporal_address,
        "--watch-namespace", namespace,
        "--leader-election-namespace", namespace,
        "--task-queue", task_queue,
        "--inference-task-queue", f"{task_queue}-inference",
        "--volume-root", str(volume_root),
        "--kubeconfig", str(kubeconfig),
        "--status-interval", "2",
    ]  # fmt: skip


class ControllerReplica:
    """One `relay controller` process (named like the chart's pod, `RELAY_POD_NAME`) with its log in a file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log: IO[bytes] = self.log_path.open("wb")
        command = [sys.executable, "-m", "controller", "controller", *args]
        command += ["--health-port", str(free_port()), "--metrics-port", str(free_port())]
        command += ["--health-bind-address", "127.0.0.1", "--metrics-bind-address", "127.0.0.1"]
        environment = {**os.environ, **(env or {}), "RELAY_POD_NAME": name}
        self.process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=self.log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def campaigning(self) -> bool:
        """Its workers are polling and it asks for the Lease (what a readiness probe would wait for)."""
        return "is a candidate" in self.text()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self, grace_s: float = 30) -> int:
        """SIGTERM, as a rolling update does; SIGKILL after `grace_s`; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log.closed:
            self.log.close()
        return self.process.returncode


def logs(replicas: list[ControllerReplica], chars: int = 5000) -> str:
    return "\n".join(f"--- {r.name} (exit {r.process.poll()})\n{r.text()[-chars:]}" for r in replicas)


def lease_holder(
    kube: kubernetes.client.ApiClient, namespace: str, replicas: list[ControllerReplica]
) -> ControllerReplica | None:
    """The replica whose identity (`<pod name>_<suffix>`) holds the Lease, if any."""
    try:
        lease: Any = kubernetes.client.CoordinationV1Api(kube).read_namespaced_lease(LEASE, namespace)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    holder = str(lease.spec.holder_identity or "")
    return next((r for r in replicas if holder.startswith(f"{r.name}_")), None)


async def wait_until(what: str, check: Callable[[], Any], timeout_s: float, replicas: list[ControllerReplica]) -> Any:
    """Poll `check` (in a thread) until truthy; on timeout an AssertionError with the replicas' logs."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs(replicas)}"
        await asyncio.sleep(0.1)
