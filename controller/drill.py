"""`relay drill`: a tiny TrainingRun under a seeded random sequence of real faults, then checks that nothing was lost.

The run uses the local backend, a `relay worker` child process and an embedded Temporal dev server whose
SQLite file lives outside the volume. Faults (each injected from outside, the way the real thing happens):

    sigterm           SIGTERM to the trainer (a preemption notice): it saves the current step and exits 75
    sigkill           SIGKILL to the trainer (node loss, OOM kill): work since the last checkpoint is lost
    sigkill-in-write  SIGKILL while a checkpoint is being written (a `.tmp-step-*` folder with its first
                      file exists; the trainer's RELAY_TEST_CHECKPOINT_WRITE_DELAY_S hook holds the write open)
    worker-restart    SIGKILL of the worker process, then a new one; the leg keeps running and is adopted
    server-restart    stop the Temporal dev server (SIGTERM) and start it again on the same database file
    enospc            fill the volume (a tmpfs mounted for the drill) so the next checkpoint write fails with
                      ENOSPC; the filler is removed once the failed leg has exited
    corrupt-newest    flip one byte in the newest checkpoint (trainer paused with SIGSTOP, no write in flight),
                      then SIGKILL it: the next leg must quarantine that checkpoint and resume from the one before

Pass = the run reaches Succeeded; its final weights' sha256 equals an uninterrupted run's (same config and
snapshot, trained after the drill by `python -m trainer train` into a separate folder); no two legs overlapped
(leg launch/exit records and the trainer pids' time spans in history.jsonl); no process of the run is
left; every quarantined checkpoint is in the status and in a CheckpointQuarantined event (the worker's log).

The table: "at step" is the last step the trainer logged when the fault landed; "recovery" runs from the
fault to a new trainer training again (leg faults) or to the workflow answering a status query again
(worker and server faults, where the leg itself keeps running); "lost" is that step minus the step the
next trainer resumed from (0 when the leg was not disturbed). Every leg sleeps RELAY_TEST_STEP_SLEEP_S per
step so faults land at the planned steps; that hook and the write-delay hook change no computed value.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller import devserver
from controller.backends.local_leg import process_start_time
from trainer.volume import RunLayout, parse_step

ALL_FAULTS = ("sigterm", "sigkill", "sigkill-in-write", "worker-restart", "server-restart", "enospc", "corrupt-newest")
NAMESPACE = "default"
RUN_NAME = "drill"
STEP_SLEEP_S = 0.04  # RELAY_TEST_STEP_SLEEP_S for every leg: room to aim faults at steps
WRITE_DELAY_S = 0.25  # RELAY_TEST_CHECKPOINT_WRITE_DELAY_S: a checkpoint write stays open this long
CHECKPOINT_EVERY = 10
GAP = (2 * CHECKPOINT_EVERY + 1, 2 * CHECKPOINT_EVERY + 10)  # steps from one recovery to the next fault
# Steps the leg trains on its own while the worker or the server is being restarted (it keeps running);
# the run is made this much longer per such fault so that every planned fault still finds it training.
DRIFT_ALLOWANCE = {"worker-restart": 450, "server-restart": 150}
TMPFS_SIZE = "256m"


class DrillError(RuntimeError):
    """The drill itself could not proceed (not a failed check): one line, exit 1."""


@dataclass
class FaultRecord:
    kind: str
    gap: int  # the fault lands this many steps after the run recovered from the previous one
    target_step: int = -1
    at_step: int = -1
    recovery_s: float | None = None
    steps_lost: int | None = None
    detail: str = ""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DrillResult:
    faults: list[FaultRecord]
    checks: list[Check]
    excluded: dict[str, str] = field(default_factory=dict)
    run_dir: Path | None = None
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return all(check.ok for check in self.checks) and all(f.recovery_s is not None for f in self.faults)


def plan(seed: int, faults: int, kinds: tuple[str, ...]) -> list[FaultRecord]:
    """The fault sequence for a seed: kinds and gaps in steps (reproducible; each gap spans two checkpoints,
    so a corrupted newest checkpoint always has a valid one before it)."""
    rng = random.Random(seed)
    return [FaultRecord(kind=rng.choice(kinds), gap=rng.randint(*GAP)) for _ in range(faults)]


def steps_for(faults: list[FaultRecord]) -> int:
    """maxSteps of the drill's run: every gap at its longest, the drift allowances, and a tail."""
    return sum(GAP[1] + 2 + DRIFT_ALLOWANCE.get(f.kind, 0) for f in faults) + 2 * CHECKPOINT_EVERY


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: int | None, start_time: int | None = None) -> bool:
    if pid is None:
        return False
    start = process_start_time(pid)
    return start is not None and (start_time is None or start == start_time)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Drill:
    """One drill: owns the volume, the dev server, the worker process and the run."""

    def __init__(self, workdir: Path, seed: int, faults: int, kinds: tuple[str, ...], *, out: Any = sys.stdout):
        self.workdir = workdir
        self.volume = workdir / "volume"
        self.seed = seed
        self.kinds = kinds
        self.n_faults = faults
        self.out = out
        self.address = f"127.0.0.1:{_free_port()}"
        self.task_queue = f"drill-{uuid.uuid4().hex[:8]}"
        self.layout = RunLayout.for_run(self.volume, NAMESPACE, RUN_NAME)
        self.server: devserver.DevServer | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log = workdir / "worker.log"
        self.mounted = False
        self.excluded: dict[str, str] = {}
        self.client: Any = None
        self.handle: Any = None
        self.corrupted: list[int] = []

    def say(self, message: str) -> None:
        print(f"drill: {message}", file=self.out, flush=True)

    # ---------------------------------------------------------------- setup and teardown

    def _mount_volume(self) -> None:
        self.volume.mkdir(parents=True, exist_ok=True)
        if "enospc" not in self.kinds:
            return
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(self.volume)],
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            self.mounted = True
            return
        reason = (result.stderr.strip() or f"mount exited {result.returncode}").splitlines()[0]
        self.excluded["enospc"] = f"no small filesystem to fill: mounting a tmpfs failed ({reason})"
        self.kinds = tuple(k for k in self.kinds if k != "enospc")

    def _start_worker(self) -> None:
        env = {
            **os.environ,
            "RELAY_TEST_STEP_SLEEP_S": str(STEP_SLEEP_S),
            "RELAY_TEST_CHECKPOINT_WRITE_DELAY_S": str(WRITE_DELAY_S),
        }
        command = [sys.executable, "-m", "controller.cli", "worker", "--address", self.address, "--volume",
                   str(self.volume), "--task-queue", self.task_queue]  # fmt: skip
        with open(self.worker_log, "ab") as log:
            self.worker = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
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

    def _teardown(self) -> None:
        self._stop_worker()
        with contextlib.suppress(Exception):
            from controller.backends.local import LocalBackend

            asyncio.run(LocalBackend(self.volume).cleanup(NAMESPACE, RUN_NAME))
        if self.server is not None:
            self.server.stop()
        if self.mounted:
            keep = self.workdir / "result"
            with contextlib.suppress(OSError):
                if self.layout.run_dir.is_dir():
                    shutil.copytree(self.layout.run_dir, keep / "runs" / NAMESPACE / RUN_NAME, dirs_exist_ok=True)
            subprocess.run(["umount", "-l", str(self.volume)], capture_output=True)
            self.mounted = False

    def _spec(self, total_steps: int) -> Any:
        from controller.spec import parse_training_run

        document = {
            "apiVersion": "relay.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": RUN_NAME, "namespace": NAMESPACE},
            "spec": {
                "model": "tiny",
                "dataset": {"source": "demo", "maxRows": 300, "evalFraction": 0.2},
                "training": {
                    "maxSteps": total_steps,
                    "batchSize": 8,
                    "maxSeqLength": 32,
                    "checkpointEverySteps": CHECKPOINT_EVERY,
                    "logEverySteps": 1,
                    "keepLast": 2,
                    "learningRate": 1e-3,
                    "evalBatchSize": 64,
                },
                "resources": {"cpu": "1"},
                "retries": {"maxPreemptions": 1000, "maxFailures": 1000, "backoffSeconds": 0},
                "terminationGracePeriodSeconds": 30,
            },
        }
        return parse_training_run(document, "drill").spec

    # ---------------------------------------------------------------- observing the run

    def progress(self) -> dict[str, Any]:
        return _read_json(self.layout.progress_path) or {}

    def running_trainer(self) -> tuple[int, int] | None:
        """(leg number, trainer pid) of the leg whose trainer is alive, if any."""
        legs = self.layout.legs_dir
        for path in (
            sorted(legs.glob("*.trainer.json"), key=lambda p: -int(p.name.split(".")[0])) if legs.is_dir() else []
        ):
            record = _read_json(path)
            if record and _alive(record.get("pid"), record.get("start_time")):
                return int(path.name.split(".")[0]), int(record["pid"])
        return None

    async def wait_for(self, what: str, condition: Any, timeout_s: float, poll_s: float = 0.02) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.handle is not None and self._run_over():
                raise DrillError(f"the run ended while waiting for {what}")
            await asyncio.sleep(poll_s)
        raise DrillError(f"timed out after {timeout_s:g}s waiting for {what}")

    def _run_over(self) -> bool:
        return (self.layout.final_dir / "manifest.json").exists()

    async def _training_at(self, step: int) -> tuple[int, int]:
        """Wait until a live trainer is running at or beyond `step`; its (leg, pid)."""

        def ready() -> tuple[int, int] | None:
            progress, trainer = self.progress(), self.running_trainer()
            running = trainer and progress.get("pid") == trainer[1] and progress.get("state") == "running"
            return trainer if running and int(progress.get("step") or 0) >= step else None

        result: tuple[int, int] = await self.wait_for(f"training to reach step {step}", ready, 240)
        return result

    async def _resumed_after(self, old_pid: int, started: float) -> tuple[float, int | None]:
        """Wait for a new trainer to run again; (seconds since `started`, the step it resumed from)."""

        def resumed() -> dict[str, Any] | None:
            progress = self.progress()
            if progress.get("pid") not in (None, old_pid) and progress.get("state") == "running":
                return progress
            return None

        progress = await self.wait_for("the run to resume", resumed, 240)
        return time.monotonic() - started, progress.get("resumed_from_step")

    async def _query_answers(self) -> None:
        from controller.workflows import CheckpointedBertTrainingWorkflow

        deadline = time.monotonic() + 120
        while True:
            try:
                await asyncio.wait_for(self.handle.query(CheckpointedBertTrainingWorkflow.get_status), 5)
                return
            except Exception as exc:  # any failure here means "not yet"
                if time.monotonic() > deadline:
                    raise DrillError(f"the workflow did not answer a status query again: {exc}") from None
                await asyncio.sleep(0.2)

    # ---------------------------------------------------------------- faults

    async def inject(self, fault: FaultRecord) -> None:
        fault.target_step = int(self.progress().get("step") or 0) + fault.gap
        leg, pid = await self._training_at(fault.target_step)
        fault.at_step = int(self.progress().get("step") or 0)
        started = time.monotonic()
        kind = fault.kind
        if kind in ("sigterm", "sigkill"):
            os.kill(pid, signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
            fault.detail = f"leg {leg} pid {pid}"
        elif kind == "sigkill-in-write":
            await self._kill_in_write(fault, leg, pid)
        elif kind == "corrupt-newest":
            await self._corrupt_newest(fault, leg, pid)
        elif kind == "enospc":
            await self._enospc(fault, leg, pid, started)
        elif kind == "worker-restart":
            assert self.worker is not None
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()
            self.worker = None
            self._start_worker()
            await self._query_answers()
            self._control_plane_fault(fault, leg, started, "the leg kept running; the new worker adopted it")
            return
        elif kind == "server-restart":
            assert self.server is not None
            await asyncio.to_thread(self.server.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.server.start)
            await self._query_answers()
            if self.worker is None or self.worker.poll() is not None:
                fault.detail = "the worker EXITED while the server was down"
                return
            self._control_plane_fault(fault, leg, started, "history kept (same db file); the worker reconnected")
            return
        else:
            raise DrillError(f"unknown fault {kind!r}")
        fault.recovery_s, resumed = await self._resumed_after(pid, started)
        fault.steps_lost = fault.at_step - resumed if resumed is not None else fault.at_step
        fault.steps_lost = max(0, fault.steps_lost)
        fault.detail += f"; resumed from step {resumed}"

    def _control_plane_fault(self, fault: FaultRecord, leg: int, started: float, what: str) -> None:
        """Recovered when the workflow answers again; no step lost when the leg was not disturbed meanwhile."""
        fault.recovery_s = time.monotonic() - started
        ended = _read_json(self.layout.legs_dir / f"{leg}.exit.json")
        if ended is None or ended.get("exit_code") == 0:  # still running, or it went on to complete
            fault.steps_lost = 0
            fault.detail = f"leg {leg}: {what}"
        else:
            fault.recovery_s = None
            fault.detail = f"leg {leg} ended while the control plane was down: {ended}"

    async def _kill_in_write(self, fault: FaultRecord, leg: int, pid: int) -> None:
        checkpoints = self.layout.checkpoints_dir

        def writing() -> Path | None:
            for tmp in checkpoints.glob(".tmp-step-*") if checkpoints.is_dir() else []:
                if (tmp / "model.safetensors").exists():
                    return tmp
            return None

        tmp: Path = await self.wait_for("a checkpoint write", writing, 60, poll_s=0.01)
        os.kill(pid, signal.SIGKILL)
        fault.at_step = int(self.progress().get("step") or fault.at_step)
        await self.wait_for("the trainer to die", lambda: not _alive(pid), 10)
        left = tmp.exists() and not (tmp / "manifest.json").exists()
        step = parse_step(tmp.name.split(".")[1].removeprefix("tmp-"))
        fault.detail = f"leg {leg}: killed inside the write of step {step}" + (
            " (half-written folder left)" if left else " (write had finished: NOT inside it)"
        )
        if not left:
            fault.detail += " [miss]"

    async def _corrupt_newest(self, fault: FaultRecord, leg: int, pid: int) -> None:
        checkpoints = self.layout.checkpoints_dir
        for _ in range(50):
            os.kill(pid, signal.SIGSTOP)
            if not list(checkpoints.glob(".tmp-step-*")):
                break
            os.kill(pid, signal.SIGCONT)  # a write is in flight: let it finish first
            await asyncio.sleep(0.05)
        else:
            raise DrillError("could not catch the trainer between checkpoint writes")
        steps = sorted(s for s in (parse_step(p.name) for p in checkpoints.iterdir()) if s is not None)
        newest = checkpoints / f"step-{steps[-1]:09d}"
        target = newest / "model.safetensors"
        with open(target, "r+b") as handle:
            handle.seek(target.stat().st_size // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0xFF]))
        os.kill(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGCONT)
        fault.detail = f"leg {leg}: flipped a byte of {newest.name}/model.safetensors, then SIGKILL"
        self.corrupted.append(steps[-1])

    async def _enospc(self, fault: FaultRecord, leg: int, pid: int, started: float) -> None:
        checkpoints = self.layout.checkpoints_dir
        sizes = [
            sum(f.stat().st_size for f in d.iterdir()) for d in checkpoints.iterdir() if d.name.startswith("step-")
        ]
        checkpoint_bytes = max(sizes)
        free = shutil.disk_usage(self.volume).free
        margin = checkpoint_bytes // 2  # room for progress, logs and leg records, not for a checkpoint
        filler = self.volume / "drill-filler"
        with open(filler, "wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, max(0, free - margin))
        log = self.layout.legs_dir / f"{leg}.log"

        def failed() -> bool:
            return not _alive(pid) or "No space left on device" in log.read_text(errors="replace")

        try:  # free the space as soon as the save failed, so the leg can still record how it ended
            await self.wait_for("a save to fail on the full volume", failed, 60, poll_s=0.02)
        finally:
            filler.unlink()
        await self.wait_for("the failed leg to exit", lambda: not _alive(pid), 60)
        fault.at_step = int(self.progress().get("step") or fault.at_step)
        saw = "No space left on device" in log.read_text(errors="replace") if log.exists() else False
        ended = await self.wait_for(
            "the leg's exit record", lambda: _read_json(self.layout.legs_dir / f"{leg}.exit.json"), 30
        )
        how = f"exit {ended['exit_code']}" if ended.get("exit_code") is not None else str(ended.get("reason") or "?")
        fault.detail = f"leg {leg}: volume filled to {margin // 1024} KiB free; " + (
            f"checkpoint write failed with ENOSPC, leg ended: {how}" if saw else "leg ended WITHOUT ENOSPC [miss]"
        )

    # ---------------------------------------------------------------- the drill

    async def run(self) -> DrillResult:
        from controller.status import Phase, RunStatus
        from controller.worker import connect
        from controller.workflows import CheckpointedBertTrainingWorkflow, TrainingRunInput

        began = time.monotonic()
        self._mount_volume()
        faults = plan(self.seed, self.n_faults, self.kinds)
        total_steps = steps_for(faults)
        for kind, why in self.excluded.items():
            self.say(f"fault {kind} left out of the mix: {why}")
        self.say(
            f"seed {self.seed}: {len(faults)} faults over {total_steps} steps: {', '.join(f.kind for f in faults)}"
        )
        self.server = devserver.DevServer(
            self.address, self.workdir / "temporal.db", log_file=self.workdir / "temporal-server.log"
        )
        await asyncio.to_thread(self.server.start)
        self._start_worker()
        self.client = await connect(self.address)
        spec = self._spec(total_steps)
        self.handle = await self.client.start_workflow(
            CheckpointedBertTrainingWorkflow.run,
            TrainingRunInput(
                namespace=NAMESPACE,
                name=RUN_NAME,
                spec=spec,
                legs_per_run=20,
                await_window_s=1.0,
                poll_interval_s=0.1,
                heartbeat_timeout_s=5.0,
            ),
            id=f"trainingrun-{NAMESPACE}-{RUN_NAME}",
            task_queue=self.task_queue,
        )
        # Without a run id: queries and the result follow the run across continue-as-new (every 20 legs).
        self.handle = self.client.get_workflow_handle_for(
            CheckpointedBertTrainingWorkflow.run, f"trainingrun-{NAMESPACE}-{RUN_NAME}"
        )
        for fault in faults:
            await self.inject(fault)
            lost = "?" if fault.steps_lost is None else fault.steps_lost
            recovery = "FAILED" if fault.recovery_s is None else f"{fault.recovery_s:.1f}s"
            self.say(f"{fault.kind} at step {fault.at_step}: recovered in {recovery}, {lost} steps lost")
        status: RunStatus = await asyncio.wait_for(self.handle.result(), 600)
        checks = [Check("run Succeeded", status.phase == Phase.SUCCEEDED, f"{status.phase.value}: {status.message}")]
        checks.append(self._check_weights(status))
        checks.extend(self._check_no_overlap())
        self._stop_worker()
        checks.append(self._check_no_orphans())
        checks.append(self._check_quarantine(status))
        misses = [f for f in faults if "[miss]" in f.detail]
        checks.append(Check("every fault landed as intended", not misses, ", ".join(f.kind for f in misses) or "yes"))
        return DrillResult(faults, checks, self.excluded, self.layout.run_dir, time.monotonic() - began)

    def _check_weights(self, status: Any) -> Check:
        reference = self.workdir / "reference"
        shutil.rmtree(reference, ignore_errors=True)
        reference.mkdir(parents=True)
        snapshot = self.volume / status.snapshot.path
        self.say("training the uninterrupted reference run (same config and snapshot)")
        result = subprocess.run(
            [sys.executable, "-m", "trainer", "train", "--run-dir", str(reference), "--snapshot", str(snapshot),
             "--config", str(self.layout.config_path)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if result.returncode != 0:
            return Check("final weights == uninterrupted run", False, f"reference run exited {result.returncode}")
        ours = _sha256(self.layout.final_dir / "model.safetensors")
        theirs = _sha256(reference / "final/model.safetensors")
        return Check("final weights == uninterrupted run", ours == theirs, f"sha256 {ours[:16]} vs {theirs[:16]}")

    def _check_no_overlap(self) -> list[Check]:
        legs = self.layout.legs_dir
        spans: list[tuple[int, Any, Any]] = []
        for path in sorted(legs.glob("*.pid.json"), key=lambda p: int(p.name.split(".")[0])):
            number = int(path.name.split(".")[0])
            launched = (_read_json(path) or {}).get("started_at")
            ended = (_read_json(legs / f"{number}.exit.json") or {}).get("ended_at")
            spans.append((number, launched, ended))
        bad = [
            f"leg {b[0]} launched {b[1] - a[2]:.3f}s before leg {a[0]} ended"
            for a, b in itertools.pairwise(spans)
            if a[2] is None or b[1] is None or b[1] < a[2]
        ]
        records = Check(
            "legs never overlapped (leg records)", not bad and bool(spans), "; ".join(bad) or f"{len(spans)} legs"
        )
        by_pid: dict[int, list[float]] = {}
        history = self.layout.history_path
        for line in history.read_text().splitlines() if history.exists() else []:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                by_pid.setdefault(int(entry["pid"]), []).append(float(entry["time"]))
        intervals = sorted((min(t), max(t), pid) for pid, t in by_pid.items())
        clash = [f"pids {a[2]} and {b[2]}" for a, b in itertools.pairwise(intervals) if b[0] < a[1]]
        trainers = Check(
            "trainer processes never overlapped (history.jsonl)",
            not clash and len(intervals) >= 1,
            "; ".join(clash) or f"{len(intervals)} trainer processes, disjoint",
        )
        return [records, trainers]

    def _check_no_orphans(self) -> Check:
        left = []
        legs = self.layout.legs_dir
        for path in legs.glob("*.json"):
            if path.name.endswith((".pid.json", ".trainer.json")):
                record = _read_json(path) or {}
                if _alive(record.get("pid"), record.get("start_time")):
                    left.append(f"{path.name} pid {record['pid']}")
        needle = str(self.volume).encode()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if needle in (proc / "cmdline").read_bytes() and _alive(int(proc.name)):
                        left.append(f"pid {proc.name}")
        return Check("no orphaned processes", not left, ", ".join(sorted(set(left))) or "none")

    def _check_quarantine(self, status: Any) -> Check:
        folders = (
            sorted(p.name for p in self.layout.quarantine_dir.iterdir()) if self.layout.quarantine_dir.is_dir() else []
        )
        steps = sorted(int(name.split(".")[0].removeprefix("step-")) for name in folders)
        in_status = sorted(q.step for q in status.quarantined)
        log = self.worker_log.read_text(errors="replace") if self.worker_log.exists() else ""
        no_event = [s for s in steps if f"CheckpointQuarantined: step {s}:" not in log]
        not_quarantined = [s for s in self.corrupted if s not in steps]
        ok = steps == in_status and not no_event and not not_quarantined
        detail = f"quarantined {steps or 'none'}; in status {in_status or 'none'}"
        if no_event:
            detail += f"; no event for {no_event}"
        if not_quarantined:
            detail += f"; corrupted but not quarantined {not_quarantined}"
        return Check("every quarantined checkpoint in status and events", ok, detail)

    async def execute(self) -> DrillResult:
        try:
            result = await self.run()
        finally:
            mounted = self.mounted
            await asyncio.to_thread(self._teardown)
        if mounted:  # the tmpfs is gone; the run folder was copied out first
            result.run_dir = self.workdir / "result" / "runs" / NAMESPACE / RUN_NAME
        return result


def format_result(result: DrillResult) -> str:
    lines = [f"{'#':>2}  {'fault':<17} {'target':>6} {'at step':>7} {'recovery':>9} {'lost':>5}  detail"]
    for number, fault in enumerate(result.faults, 1):
        recovery = "FAILED" if fault.recovery_s is None else f"{fault.recovery_s:.1f}s"
        lost = "?" if fault.steps_lost is None else str(fault.steps_lost)
        row = f"{number:>2}  {fault.kind:<17} {fault.target_step:>6} {fault.at_step:>7} {recovery:>9} {lost:>5}"
        lines.append(f"{row}  {fault.detail}")
    lines.append("")
    for check in result.checks:
        lines.append(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    for kind, why in result.excluded.items():
        lines.append(f"NOTE  {kind} not injected: {why}")
    lines.append(f"drill {'PASSED' if result.passed else 'FAILED'} in {result.wall_s:.0f}s")
    return "\n".join(lines)


def run_drill(
    seed: int, faults: int, volume: str | None, kinds: tuple[str, ...] = ALL_FAULTS
) -> tuple[int, DrillResult | None]:
    """Run one drill and print its table; (exit code, result). 0 only when every check passed."""
    unknown = [k for k in kinds if k not in ALL_FAULTS]
    if unknown:
        print(f"relay drill: --kinds: unknown fault {unknown[0]!r} (known: {', '.join(ALL_FAULTS)})", file=sys.stderr)
        return 2, None
    if faults < 1:
        print("relay drill: --faults: must be at least 1", file=sys.stderr)
        return 2, None
    workdir = Path(volume).resolve() if volume else Path(tempfile.mkdtemp(prefix="relay-drill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "volume").exists() and any((workdir / "volume").iterdir()):
        print(f"relay drill: --volume {workdir}: holds an earlier drill; give an empty folder", file=sys.stderr)
        return 2, None
    drill = Drill(workdir, seed, faults, kinds)
    try:
        result = asyncio.run(drill.execute())
    except DrillError as exc:
        print(f"relay drill: FAILED: {exc} (logs in {workdir})", file=sys.stderr)
        return 1, None
    print(format_result(result))
    print(f"drill folder: {workdir}")
    return (0 if result.passed else 1), result
