"""What every drill shares: the seeded plan, the faults aimed at training steps, the checks and the table.

A backend's drill (local.py, kubernetes.py) supplies how its services start and stop, how a leg is found and
killed, and how its legs' lifetimes and events are read; this module injects the faults and judges the run.

Faults (each injected from outside, the way the real thing happens):

    sigterm           a preemption notice: SIGTERM to the trainer (local), the Eviction API (Kubernetes);
                      the trainer saves the current step and exits 75
    sigkill           node loss or OOM: SIGKILL to the trainer (local), the kubelet's hard eviction
                      (Kubernetes); work since the last checkpoint is lost
    sigkill-in-write  the same while a checkpoint is being written (a `.tmp-[g<leg>-]step-*` folder with its first file
                      exists; the trainer's RELAY_TEST_CHECKPOINT_WRITE_DELAY_S hook holds the write open)
    worker-restart    (local) SIGKILL of the `relay worker` process, then a new one
    controller-restart  (Kubernetes) SIGKILL of the `relay controller` process, then a new one; either way the
                      leg keeps running and the new process adopts it
    server-restart    stop the Temporal dev server (SIGTERM) and start it again on the same database file
    enospc            fill the volume (a tmpfs mounted for the drill) so the next checkpoint write fails with
                      ENOSPC; the filler is removed once the failed leg has exited
    corrupt-newest    flip one byte in the newest checkpoint (trainer paused with SIGSTOP, no write in flight),
                      then kill it: the next leg must quarantine that checkpoint and resume from the one before
    stalled-leg       SIGSTOP to the trainer and nothing else: alive but silent (a hung trainer or mount); the
                      backend must call it ProgressStalled after retries.progressStallSeconds (STALL_S), kill it
                      and start the next leg (issue 13)
    node-lost         (Kubernetes, with a node harness) the leg's node is cut off from the API server and goes
                      NotReady (Ready=Unknown) while its trainer keeps running and writing the volume; the
                      controller must start the next leg after retries.nodeLostAfterSeconds (NODE_LOST_S), and
                      the old trainer must end fenced (exit 76) with no commit after the fence moved; then the
                      node comes back Ready (issue 13). Locally there is no node: stalled-leg is the analogue

Pass = the run reaches Succeeded; its final weights' sha256 equals an uninterrupted run's (same config and
snapshot, trained after the drill by `python -m trainer train` into a separate folder); no two legs overlapped
(the backend's leg lifetimes, and the trainer pids' time spans in history.jsonl; a node-lost leg may overlap
the next one only when it ended fenced, exit 76, and no checkpoint, progress or history record of its generation
is newer than fence.json's writtenAt: FencedLeg); nothing of the run is left
running; every quarantined checkpoint is in the status and in a CheckpointQuarantined event.

The table: "at step" is the last step the trainer logged when the fault landed; "recovery" runs from the
fault to a new trainer training again (leg faults) or to the workflow answering a status query again
(worker, controller and server faults, where the leg itself keeps running); "lost" is that step minus the
step the next trainer resumed from (0 when the leg was not disturbed). Every leg sleeps
RELAY_TEST_STEP_SLEEP_S per step so faults land at the planned steps; that hook and the write-delay hook
change no computed value.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller import devserver
from controller.backends.local_leg import process_start_time
from controller.spec import workflow_id
from trainer.volume import MANIFEST_NAME, RunLayout, parse_step, read_history, read_progress

RUN_NAME = "drill"
STEP_SLEEP_S = 0.04  # RELAY_TEST_STEP_SLEEP_S for every leg: room to aim faults at steps
WRITE_DELAY_S = 0.25  # RELAY_TEST_CHECKPOINT_WRITE_DELAY_S: a checkpoint write stays open this long
TRAINER_TEST_ENV = {
    "RELAY_TEST_STEP_SLEEP_S": str(STEP_SLEEP_S),
    "RELAY_TEST_CHECKPOINT_WRITE_DELAY_S": str(WRITE_DELAY_S),
}
CHECKPOINT_EVERY = 10
GAP = (2 * CHECKPOINT_EVERY + 1, 2 * CHECKPOINT_EVERY + 10)  # steps from one recovery to the next fault
# Steps the leg trains on its own while a control-plane process is being restarted (it keeps running);
# the run is made this much longer per such fault so that every planned fault still finds it training.
# node-lost: the cut-off leg trains on through nodeLostAfterSeconds (NODE_LOST_S) and the controller's next check.
DRIFT_ALLOWANCE = {"worker-restart": 450, "controller-restart": 600, "server-restart": 150, "node-lost": 400}
TMPFS_SIZE = "256m"
# retries.progressStallSeconds of the drill's run when stalled-leg is in the mix: longer than any healthy gap
# between two progress writes of a leg, its start included (imports, snapshot, model, checkpoint verification:
# over 8 s on a loaded 2-core machine, where 8 s here killed eight fresh legs in a row), short enough for a drill.
STALL_S = 30.0
# retries.nodeLostAfterSeconds of the drill's run when node-lost is in the mix.
NODE_LOST_S = 5.0


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
class FencedLeg:
    """What a node-lost fault left of its old leg: how it ended and what it committed after the fence moved.

    `late` lists every record of the old generation newer than fence.json's writtenAt: a history.jsonl line or
    progress.json of its pid, or a checkpoint folder renamed into place (its ctime) after the fence and before
    any newer trainer started. The leg may overlap the next one only when `ok`.
    """

    exit_code: int | None
    fence_moved_at: float  # fence.json's writtenAt, or its rename into place when that came later
    newer: int
    late: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == FENCED_EXIT and not self.late


FENCED_EXIT = 76  # trainer.volume.ExitCode.FENCED


def fence_moved_at(layout: RunLayout) -> tuple[int, float] | None:
    """(generation, when the fence moved to it): fence.json's writtenAt, or its ctime (the atomic rename that made
    it visible, after writtenAt was taken) when later; a trainer's check sees the file only from then on."""
    record = read_json(layout.fence_path)
    if record is None or not isinstance(record.get("generation"), int):
        return None
    with contextlib.suppress(OSError):
        return record["generation"], max(float(record.get("writtenAt") or 0.0), layout.fence_path.stat().st_ctime)
    return None


def late_commits(layout: RunLayout, pid: int, written_at: float, others_from: float | None) -> list[str]:
    """Records of trainer `pid` newer than the fence's move at `written_at` (see FencedLeg); `others_from`: when the
    first newer trainer started (checkpoints committed after that may be its own), None when none has yet."""
    late = [f"history.jsonl step {e.step} at +{e.time - written_at:.3f}s"
            for e in read_history(layout) if e.pid == pid and e.time > written_at]  # fmt: skip
    progress = read_progress(layout) or {}
    if progress.get("pid") == pid and float(progress.get("updated_at") or 0.0) > written_at:
        late.append(f"progress.json step {progress.get('step')}")
    checkpoints = layout.checkpoints_dir
    for folder in sorted(checkpoints.glob("step-*")) if checkpoints.is_dir() else []:
        with contextlib.suppress(OSError):
            renamed = folder.stat().st_ctime
            if renamed > written_at and (others_from is None or renamed < others_from):
                late.append(f"checkpoint {folder.name} at +{renamed - written_at:.3f}s")
    return late


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
    backend: str = "local"

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


def checkpoint_temps(checkpoints: Path) -> list[Path]:
    """Checkpoint writes in flight: `.tmp-g<leg>-step-*` (a fenced leg's, trainer.volume.fencing) or `.tmp-step-*`."""
    if not checkpoints.is_dir():
        return []
    return [*checkpoints.glob(".tmp-g*-step-*"), *checkpoints.glob(".tmp-step-*")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def alive(pid: int | None, start_time: int | None = None) -> bool:
    if pid is None:
        return False
    start = process_start_time(pid)
    return start is not None and (start_time is None or start == start_time)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_document(
    namespace: str, total_steps: int, stall_s: float | None = None, node_lost_s: float | None = None
) -> dict[str, Any]:
    """The drill's TrainingRun: the tiny model on 300 demo reviews, a checkpoint every 10 steps; `stall_s` sets
    retries.progressStallSeconds, `node_lost_s` retries.nodeLostAfterSeconds."""
    document: dict[str, Any] = {
        "apiVersion": "relay.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": RUN_NAME, "namespace": namespace},
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
    if stall_s is not None:
        document["spec"]["retries"]["progressStallSeconds"] = stall_s
    if node_lost_s is not None:
        document["spec"]["retries"]["nodeLostAfterSeconds"] = node_lost_s
    return document


class Drill(abc.ABC):
    """One drill: owns the volume, the Temporal dev server and the run; a subclass owns the backend's side."""

    backend_name = "local"
    restart_fault = "worker-restart"  # the fault that kills and restarts the process hosting the worker

    def __init__(
        self, workdir: Path, seed: int, faults: int, kinds: tuple[str, ...], namespace: str, *, out: Any = sys.stdout
    ):
        self.workdir = workdir
        self.volume = workdir / "volume"
        self.seed = seed
        self.kinds = kinds
        self.n_faults = faults
        self.out = out
        self.namespace = namespace
        self.address = f"127.0.0.1:{free_port()}"
        self.layout = RunLayout.for_run(self.volume, namespace, RUN_NAME)
        self.server: devserver.DevServer | None = None
        self.mounted = False
        self.excluded: dict[str, str] = {}
        self.client: Any = None
        self.handle: Any = None
        self.corrupted: list[int] = []

    def say(self, message: str) -> None:
        print(f"drill: {message}", file=self.out, flush=True)

    # ---------------------------------------------------------------- what a backend supplies

    @abc.abstractmethod
    async def start_backend(self) -> None:
        """Start what hosts the worker and runs legs (the dev server is up, self.address answers)."""

    @abc.abstractmethod
    async def submit(self, document: dict[str, Any]) -> None:
        """Start the run from its TrainingRun document; the workflow id is controller.spec.workflow_id's."""

    @abc.abstractmethod
    async def restart_host(self) -> str:
        """SIGKILL the process hosting the worker and start a new one; a line for the table."""

    @abc.abstractmethod
    def stop_backend(self) -> None:
        """Stop what start_backend started (idempotent; also after a failure)."""

    @abc.abstractmethod
    def running_trainer(self) -> tuple[int, int] | None:
        """(leg number, trainer pid) of the leg whose trainer is alive, if any."""

    @abc.abstractmethod
    async def kill_leg(self, leg: int, pid: int, hard: bool) -> str:
        """Preempt the leg: with notice (SIGTERM) or without (SIGKILL); what was done, e.g. "SIGKILL to pid 7"."""

    @abc.abstractmethod
    def leg_log(self, leg: int) -> str:
        """The leg trainer's output so far."""

    @abc.abstractmethod
    def leg_ended(self, leg: int) -> dict[str, Any] | None:
        """How the leg ended ({"exit_code", "reason", and "message" where the backend keeps one}), or None while
        it runs."""

    @abc.abstractmethod
    def check_legs_disjoint(self) -> Check:
        """From the backend's own record of leg lifetimes: no two legs of the run alive at once."""

    @abc.abstractmethod
    async def check_nothing_left(self) -> Check:
        """After the run: no leg process (and no leg object) of the run remains."""

    @abc.abstractmethod
    async def quarantine_events(self) -> str:
        """Text holding every CheckpointQuarantined event, one `step N:` message each."""

    async def lose_node(self, fault: FaultRecord, leg: int, pid: int) -> None:
        """node-lost: cut the leg's node off (see the module docstring); only a backend with nodes has it."""
        raise DrillError(f"fault node-lost: the {self.backend_name} backend has no node to lose")

    async def published_phase(self) -> Check | None:
        """Where the backend publishes status elsewhere too (the TrainingRun object): it says Succeeded."""
        return None

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

    def _teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_backend()
        if self.server is not None:
            self.server.stop()
        if self.mounted:
            keep = self.workdir / "result"
            with contextlib.suppress(OSError):
                if self.layout.run_dir.is_dir():
                    shutil.copytree(self.layout.run_dir, keep / self.layout.run_dir.relative_to(self.volume),
                                    dirs_exist_ok=True)  # fmt: skip
            subprocess.run(["umount", "-l", str(self.volume)], capture_output=True)
            self.mounted = False

    # ---------------------------------------------------------------- observing the run

    def progress(self) -> dict[str, Any]:
        """progress.json through the contract's typed reader (one spelling per key); {} while there is none."""
        return read_progress(self.layout) or {}

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
        return (self.layout.final_dir / MANIFEST_NAME).exists()

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

    async def _query_answers(self, timeout_s: float = 120) -> None:
        from controller.workflows import CheckpointedBertTrainingWorkflow

        deadline = time.monotonic() + timeout_s
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
            fault.detail = f"leg {leg}: " + await self.kill_leg(leg, pid, hard=kind == "sigkill")
        elif kind == "sigkill-in-write":
            await self._kill_in_write(fault, leg, pid)
        elif kind == "corrupt-newest":
            await self._corrupt_newest(fault, leg, pid)
        elif kind == "enospc":
            await self._enospc(fault, leg, pid)
        elif kind == "stalled-leg":
            os.kill(pid, signal.SIGSTOP)  # alive, silent: only the backend's stall check ends it
            fault.detail = f"leg {leg}: SIGSTOP to pid {pid}, left stopped (progressStallSeconds {STALL_S:g})"
        elif kind == "node-lost":
            await self.lose_node(fault, leg, pid)
        elif kind == self.restart_fault:
            what = await self.restart_host()
            await self._query_answers()
            self._control_plane_fault(fault, leg, started, what)
            return
        elif kind == "server-restart":
            assert self.server is not None
            await asyncio.to_thread(self.server.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.server.start)
            await self._query_answers()
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
        ended = self.leg_ended(leg)
        if ended is None or ended.get("exit_code") == 0:  # still running, or it went on to complete
            fault.steps_lost = 0
            fault.detail = f"leg {leg}: {what}"
        else:
            fault.recovery_s = None
            fault.detail = f"leg {leg} ended while the control plane was down: {ended}"

    async def _kill_in_write(self, fault: FaultRecord, leg: int, pid: int) -> None:
        checkpoints = self.layout.checkpoints_dir

        def writing() -> Path | None:
            for tmp in checkpoint_temps(checkpoints):
                if (tmp / "model.safetensors").exists():
                    return tmp
            return None

        tmp: Path = await self.wait_for("a checkpoint write", writing, 60, poll_s=0.01)
        how = await self.kill_leg(leg, pid, hard=True)
        fault.at_step = int(self.progress().get("step") or fault.at_step)
        await self.wait_for("the trainer to die", lambda: not alive(pid), 10)
        left = tmp.exists() and not (tmp / "manifest.json").exists()
        step = parse_step(re.sub(r"^tmp-(g\d+-)?", "", tmp.name.split(".")[1]))
        fault.detail = f"leg {leg}: {how} inside the write of step {step}" + (
            " (half-written folder left)" if left else " (write had finished: NOT inside it)"
        )
        if not left:
            fault.detail += " [miss]"

    async def _corrupt_newest(self, fault: FaultRecord, leg: int, pid: int) -> None:
        checkpoints = self.layout.checkpoints_dir
        for _ in range(50):
            os.kill(pid, signal.SIGSTOP)
            if not checkpoint_temps(checkpoints):
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
        how = await self.kill_leg(leg, pid, hard=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        fault.detail = f"leg {leg}: flipped a byte of {newest.name}/model.safetensors, then {how}"
        self.corrupted.append(steps[-1])

    async def _enospc(self, fault: FaultRecord, leg: int, pid: int) -> None:
        checkpoints = self.layout.checkpoints_dir
        sizes = [
            sum(f.stat().st_size for f in d.iterdir()) for d in checkpoints.iterdir() if d.name.startswith("step-")
        ]
        checkpoint_bytes = max(sizes)
        margin = checkpoint_bytes // 2  # room for progress, logs and leg records, not for a checkpoint
        filler = self.volume / "drill-filler"
        with open(filler, "wb") as handle:
            size = 0
            for _ in range(20):  # the trainer may be writing meanwhile: fill up to the margin, however it moves
                grow = shutil.disk_usage(self.volume).free - margin
                if grow <= 0:
                    break
                try:
                    os.posix_fallocate(handle.fileno(), size, grow)
                    size += grow
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise

        def failed() -> bool:
            return not alive(pid) or "No space left on device" in self.leg_log(leg)

        try:  # free the space as soon as the save failed, so the leg can still record how it ended
            await self.wait_for("a save to fail on the full volume", failed, 60, poll_s=0.02)
        finally:
            filler.unlink()
        await self.wait_for("the failed leg to exit", lambda: not alive(pid), 60)
        fault.at_step = int(self.progress().get("step") or fault.at_step)
        ended = await self.wait_for("the leg's end to be recorded", lambda: self.leg_ended(leg), 30)
        # The error line may not fit on the full volume itself (its log's last page filled up too): the leg's end
        # record, written once the filler is gone, carries the trainer's termination message.
        saw = any("No space left on device" in text for text in (self.leg_log(leg), json.dumps(ended)))
        how = f"exit {ended['exit_code']}" if ended.get("exit_code") is not None else str(ended.get("reason") or "?")
        fault.detail = f"leg {leg}: volume filled to {margin // 1024} KiB free; " + (
            f"checkpoint write failed with ENOSPC, leg ended: {how}" if saw else "leg ended WITHOUT ENOSPC [miss]"
        )

    # ---------------------------------------------------------------- the drill

    async def run(self) -> DrillResult:
        from controller.status import Phase, RunStatus
        from controller.worker import connect
        from controller.workflows import CheckpointedBertTrainingWorkflow

        began = time.monotonic()
        self._mount_volume()
        faults = plan(self.seed, self.n_faults, self.kinds)
        total_steps = steps_for(faults)
        for kind, why in self.excluded.items():
            self.say(f"fault {kind} left out of the mix: {why}")
        self.say(
            f"{self.backend_name} backend, seed {self.seed}: {len(faults)} faults over {total_steps} steps: "
            + ", ".join(f.kind for f in faults)
        )
        self.server = devserver.DevServer(
            self.address, self.workdir / "temporal.db", log_file=self.workdir / "temporal-server.log"
        )
        await asyncio.to_thread(self.server.start)
        await self.start_backend()
        self.client = await connect(self.address)
        stall_s = STALL_S if "stalled-leg" in self.kinds else None
        node_lost_s = NODE_LOST_S if "node-lost" in self.kinds else None
        await self.submit(run_document(self.namespace, total_steps, stall_s, node_lost_s))
        # Without a run id: queries and the result follow the run across continue-as-new.
        self.handle = self.client.get_workflow_handle_for(
            CheckpointedBertTrainingWorkflow.run, workflow_id(self.namespace, RUN_NAME)
        )
        for fault in faults:
            await self.inject(fault)
            lost = "?" if fault.steps_lost is None else fault.steps_lost
            recovery = "FAILED" if fault.recovery_s is None else f"{fault.recovery_s:.1f}s"
            self.say(f"{fault.kind} at step {fault.at_step}: recovered in {recovery}, {lost} steps lost")
        status: RunStatus = await asyncio.wait_for(self._result(), 600)
        checks = [Check("run Succeeded", status.phase == Phase.SUCCEEDED, f"{status.phase.value}: {status.message}")]
        published = await self.published_phase()
        if published is not None:
            checks.append(published)
        checks.append(self._check_weights(status))
        checks.append(self.check_legs_disjoint())
        checks.append(self._check_trainers_disjoint())
        checks.append(await self.check_nothing_left())
        checks.append(await self._check_quarantine(status))
        misses = [f for f in faults if "[miss]" in f.detail]
        checks.append(Check("every fault landed as intended", not misses, ", ".join(f.kind for f in misses) or "yes"))
        return DrillResult(
            faults, checks, self.excluded, self.layout.run_dir, time.monotonic() - began, self.backend_name
        )

    async def _result(self) -> Any:
        """The workflow's result (it may not exist yet for a moment when something else starts it)."""
        from temporalio.service import RPCError

        while True:
            try:
                return await self.handle.result()
            except RPCError as exc:
                if "not found" not in str(exc).lower():
                    raise
                await asyncio.sleep(0.5)

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
        ours = sha256(self.layout.final_dir / "model.safetensors")
        theirs = sha256(reference / "final/model.safetensors")
        return Check("final weights == uninterrupted run", ours == theirs, f"sha256 {ours[:16]} vs {theirs[:16]}")

    @staticmethod
    def spans_disjoint(
        name: str, spans: list[tuple[str, float | None, float | None]], fenced: dict[str, FencedLeg] | None = None
    ) -> Check:
        """A check that (label, start, end) spans sorted by start never overlap; a missing end is a failure.

        One exception (node-lost): a span whose label is in `fenced` with an `ok` FencedLeg (exit 76, nothing
        committed after the fence moved) may overlap the spans after it; any other overlap fails.
        """
        fenced = fenced or {}
        spans = sorted(spans, key=lambda s: (s[1] is None, s[1] or 0.0))
        bad, allowed = [], []
        for a, b in itertools.pairwise(spans):
            if a[2] is None or b[1] is None:
                bad.append(f"{a[0]} or {b[0]} has no recorded start or end")
            elif b[1] < a[2]:
                overlap = f"{b[0]} began {a[2] - b[1]:.3f}s before {a[0]} ended"
                leg = fenced.get(a[0])
                if leg is not None and leg.ok:
                    allowed.append(f"{overlap} (allowed: {a[0]} fenced, exit 76, nothing committed after the fence)")
                elif leg is not None:
                    why = f"exit {leg.exit_code}" if leg.exit_code != FENCED_EXIT else "late: " + ", ".join(leg.late)
                    bad.append(f"{overlap}; {a[0]} was cut off but not cleanly fenced ({why})")
                else:
                    bad.append(overlap)
        fine = f"{len(spans)} legs, disjoint" if not allowed else f"{len(spans)} legs; " + "; ".join(allowed)
        detail = "; ".join(bad) or fine
        return Check(name, not bad and bool(spans), detail)

    def _check_trainers_disjoint(self) -> Check:
        by_pid: dict[int, list[float]] = {}
        for entry in read_history(self.layout):
            if entry.pid is not None:
                by_pid.setdefault(entry.pid, []).append(entry.time)
        intervals = sorted((min(t), max(t), pid) for pid, t in by_pid.items())
        clash = [f"pids {a[2]} and {b[2]}" for a, b in itertools.pairwise(intervals) if b[0] < a[1]]
        return Check(
            "trainer processes never overlapped (history.jsonl)",
            not clash and len(intervals) >= 1,
            "; ".join(clash) or f"{len(intervals)} trainer processes, disjoint",
        )

    def processes_on_volume(self, hosts: tuple[int, ...] = ()) -> list[str]:
        """Live processes (other than this one and the `hosts` still serving) whose command line names the volume."""
        left = []
        needle = str(self.volume).encode()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) not in (os.getpid(), *hosts):
                with contextlib.suppress(OSError):
                    if needle in (proc / "cmdline").read_bytes() and alive(int(proc.name)):
                        left.append(f"pid {proc.name}")
        return left

    async def _check_quarantine(self, status: Any) -> Check:
        quarantine = self.layout.quarantine_dir
        folders = sorted(p.name for p in quarantine.iterdir()) if quarantine.is_dir() else []
        steps = sorted(int(name.split(".")[0].removeprefix("step-")) for name in folders)
        in_status = sorted(q.step for q in status.quarantined)
        events = await self.quarantine_events()
        no_event = [s for s in steps if f"step {s}:" not in events]
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
            result.run_dir = self.workdir / "result" / self.layout.run_dir.relative_to(self.volume)
        return result


def format_result(result: DrillResult) -> str:
    lines = [f"{'#':>2}  {'fault':<18} {'target':>6} {'at step':>7} {'recovery':>9} {'lost':>5}  detail"]
    for number, fault in enumerate(result.faults, 1):
        recovery = "FAILED" if fault.recovery_s is None else f"{fault.recovery_s:.1f}s"
        lost = "?" if fault.steps_lost is None else str(fault.steps_lost)
        row = f"{number:>2}  {fault.kind:<18} {fault.target_step:>6} {fault.at_step:>7} {recovery:>9} {lost:>5}"
        lines.append(f"{row}  {fault.detail}")
    lines.append("")
    for check in result.checks:
        lines.append(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    for kind, why in result.excluded.items():
        lines.append(f"NOTE  {kind} not injected: {why}")
    verdict = "PASSED" if result.passed else "FAILED"
    lines.append(f"drill {verdict} in {result.wall_s:.0f}s ({result.backend} backend)")
    return "\n".join(lines)
