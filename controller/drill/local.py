"""The drill on the local backend: legs run under the local supervisor, the worker is a `relay worker` process.

Leg lifetimes come from the supervisor's records (legs/<n>.pid.json launch, legs/<n>.exit.json end);
CheckpointQuarantined events are the worker's log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from controller.drill.core import TRAINER_TEST_ENV, Check, Drill, alive, read_json
from controller.spec import workflow_id

NAMESPACE = "default"


class LocalDrill(Drill):
    backend_name = "local"
    restart_fault = "worker-restart"

    def __init__(self, workdir: Path, seed: int, faults: int, kinds: tuple[str, ...], *, out: Any = sys.stdout):
        super().__init__(workdir, seed, faults, kinds, NAMESPACE, out=out)
        self.task_queue = f"drill-{uuid.uuid4().hex[:8]}"
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log = self.workdir / "worker.log"

    def _start_worker(self) -> None:
        command = [sys.executable, "-m", "controller.cli", "worker", "--address", self.address, "--volume",
                   str(self.volume), "--task-queue", self.task_queue]  # fmt: skip
        with open(self.worker_log, "ab") as log:
            self.worker = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **TRAINER_TEST_ENV},  # legs inherit the worker's environment
                start_new_session=True,
            )

    def _stop_worker(self, sig: int = signal.SIGTERM) -> None:
        worker, self.worker = self.worker, None
        if worker is None or worker.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, sig)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()

    async def start_backend(self) -> None:
        self._start_worker()

    async def submit(self, document: dict[str, Any]) -> None:
        from controller.spec import parse_training_run
        from controller.workflows import CheckpointedBertTrainingWorkflow, TrainingRunInput

        spec = parse_training_run(document, "drill").spec
        await self.client.start_workflow(
            CheckpointedBertTrainingWorkflow.run,
            TrainingRunInput(
                namespace=self.namespace,
                name=document["metadata"]["name"],
                spec=spec,
                legs_per_run=20,
                await_window_s=1.0,
                poll_interval_s=0.1,
                heartbeat_timeout_s=5.0,
            ),
            id=workflow_id(self.namespace, document["metadata"]["name"]),
            task_queue=self.task_queue,
        )

    async def restart_host(self) -> str:
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        await asyncio.to_thread(self.worker.wait)
        self.worker = None
        self._start_worker()
        return "the leg kept running; the new worker adopted it"

    def stop_backend(self) -> None:
        self._stop_worker()
        with contextlib.suppress(Exception):
            from controller.backends.local import LocalBackend

            asyncio.run(LocalBackend(self.volume).cleanup(self.namespace, self.layout.run_dir.name))

    def running_trainer(self) -> tuple[int, int] | None:
        legs = self.layout.legs_dir
        records = sorted(legs.glob("*.trainer.json"), key=lambda p: -int(p.name.split(".")[0])) if legs.is_dir() else []
        for path in records:
            record = read_json(path)
            if record and alive(record.get("pid"), record.get("start_time")):
                return int(path.name.split(".")[0]), int(record["pid"])
        return None

    async def kill_leg(self, leg: int, pid: int, hard: bool) -> str:
        sig = signal.SIGKILL if hard else signal.SIGTERM
        os.kill(pid, sig)
        return f"{sig.name} to pid {pid}"

    def leg_log(self, leg: int) -> str:
        log = self.layout.legs_dir / f"{leg}.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def leg_ended(self, leg: int) -> dict[str, Any] | None:
        return read_json(self.layout.legs_dir / f"{leg}.exit.json")

    def check_legs_disjoint(self) -> Check:
        legs = self.layout.legs_dir
        spans: list[tuple[str, float | None, float | None]] = []
        for path in sorted(legs.glob("*.pid.json"), key=lambda p: int(p.name.split(".")[0])):
            number = int(path.name.split(".")[0])
            launched = (read_json(path) or {}).get("started_at")
            ended = (read_json(legs / f"{number}.exit.json") or {}).get("ended_at")
            spans.append((f"leg {number}", launched, ended))
        return self.spans_disjoint("legs never overlapped (leg records)", spans)

    async def check_nothing_left(self) -> Check:
        self._stop_worker()
        left = []
        for path in self.layout.legs_dir.glob("*.json"):
            if path.name.endswith((".pid.json", ".trainer.json")):
                record = read_json(path) or {}
                if alive(record.get("pid"), record.get("start_time")):
                    left.append(f"{path.name} pid {record['pid']}")
        left += self.processes_on_volume()
        return Check("no orphaned processes", not left, ", ".join(sorted(set(left))) or "none")

    async def quarantine_events(self) -> str:
        log = self.worker_log.read_text(errors="replace") if self.worker_log.exists() else ""
        return "\n".join(line.split("CheckpointQuarantined: ", 1)[1] for line in log.splitlines()
                         if "CheckpointQuarantined: " in line)  # fmt: skip
