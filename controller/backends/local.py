"""LocalBackend: each leg is a trainer process on this machine, supervised, surviving a worker restart.

A leg runs as `python -m controller.backends.local_leg ... -- python -m trainer train --run-dir ...
--snapshot ... --config ...` in its own session. Per leg, under `runs/<ns>/<name>/legs/`:

    <n>.pid.json      supervisor pid + its start time (from /proc), written at launch
    <n>.trainer.json  the trainer's pid + start time, written by the supervisor
    <n>.exit.json     exit code / signal, written atomically by the supervisor when the trainer ends
    <n>.log           the trainer's stdout and stderr

A restarted worker adopts a leg whose supervisor is alive (same pid *and* start time), reads the exit
file of one that ended, and treats one whose supervisor vanished without an exit file as lost
(preempted; its orphaned trainer is killed). Stop = SIGTERM, then SIGKILL of the whole process group
after the grace period, like a pod. Launch refuses while another leg of the same run is alive.

Predictions run `python -m trainer predict` as a child process over the request's work folder; it is
killed on timeout or cancellation, and the work folder removed once its results are read.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from controller.backends.base import (
    LegConflict,
    PredictFailed,
    RunIdentityMismatch,
    prepare_predict_work,
    read_predictions,
    remove_predict_work,
)
from controller.backends.local_leg import last_log_line, process_start_time
from controller.leg_model import LegHandle, LegObservation, LegSpec, LegState, LegTermination, Prediction, PredictJob
from controller.spec import ResourcesSpec
from trainer.volume import RunLayout, atomic_write_json, load_progress, read_json

_POLL_S = 0.05


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def refuse_multinode(resources: ResourcesSpec) -> str | None:
    """Why this backend cannot run a leg of `resources` (a TrainingRunSpec's), or None: it has one node."""
    if resources.nodes > 1:
        return (
            f"spec.resources.nodes: {resources.nodes} nodes need the Kubernetes backend (an Indexed Job); the local "
            "backend runs a leg on this one machine: use resources.processes for several ranks here"
        )
    return None


def _alive(record: dict[str, Any] | None) -> bool:
    """The process of a pid record still runs (same pid and same start time: not a reused pid)."""
    if not record or not isinstance(record.get("pid"), int):
        return False
    start = process_start_time(record["pid"])
    return start is not None and start == record.get("start_time")


class LocalBackend:
    """Legs as local child processes over a local folder as the volume."""

    def __init__(
        self,
        volume_root: Path | str,
        *,
        python: str = sys.executable,
        extra_env: dict[str, str] | None = None,
        trainer_module: str = "trainer",
    ) -> None:
        self.volume_root = Path(volume_root).resolve()
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.trainer_module = trainer_module
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ---------------------------------------------------------------- paths

    def _layout(self, namespace: str, name: str) -> RunLayout:
        return RunLayout.for_run(self.volume_root, namespace, name)

    def _files(self, leg: LegSpec) -> dict[str, Path]:
        legs = self._layout(leg.namespace, leg.name).legs_dir
        n = leg.leg
        return {
            "pid": legs / f"{n}.pid.json",
            "trainer": legs / f"{n}.trainer.json",
            "exit": legs / f"{n}.exit.json",
            "log": legs / f"{n}.log",
        }

    def trainer_command(self, leg: LegSpec) -> list[str]:
        return [self.python, "-m", self.trainer_module, *leg.trainer_args(str(self.volume_root))]

    @contextmanager
    def _run_lock(self, leg: LegSpec) -> Iterator[None]:
        legs_dir = self._layout(leg.namespace, leg.name).legs_dir
        legs_dir.mkdir(parents=True, exist_ok=True)
        with open(legs_dir / ".launch.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _reap(self) -> None:
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[pid]

    def alive_legs(self, namespace: str, name: str) -> list[int]:
        """Leg numbers of this run whose supervisor process is alive."""
        self._reap()
        legs_dir = self._layout(namespace, name).legs_dir
        alive = []
        for path in legs_dir.glob("*.pid.json") if legs_dir.is_dir() else []:
            number = path.name.split(".")[0]
            if number.isdigit() and _alive(_read(path)):
                alive.append(int(number))
        return sorted(alive)

    # ---------------------------------------------------------------- Backend

    async def launch(self, leg: LegSpec) -> LegHandle:
        return await asyncio.to_thread(self._launch, leg)

    def _launch(self, leg: LegSpec) -> LegHandle:
        refused = refuse_multinode(leg.spec.resources)
        if refused:
            raise RunIdentityMismatch(f"TrainingRun {leg.namespace}/{leg.name}: {refused}")
        files = self._files(leg)
        with self._run_lock(leg):
            record = _read(files["pid"])
            if record is not None:  # launched before: adopt it, running or ended
                return LegHandle(
                    leg=leg.leg, backend_id=f"pid:{record['pid']}", started_at=record["started_at"], adopted=True
                )
            others = [n for n in self.alive_legs(leg.namespace, leg.name) if n != leg.leg]
            if others:
                run = f"{leg.namespace}/{leg.name}"
                raise LegConflict(f"{run}: leg {others[0]} is still running; not starting leg {leg.leg}")
            for stale in ("trainer", "exit"):
                files[stale].unlink(missing_ok=True)
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
            env |= self.extra_env | leg.extra_env
            command = [
                self.python,
                "-m",
                "controller.backends.local_leg",
                "--exit-file",
                str(files["exit"]),
                "--trainer-file",
                str(files["trainer"]),
                "--log-file",
                str(files["log"]),
                "--",
                *self.trainer_command(leg),
            ]
            with open(files["log"], "ab") as log:
                child = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.volume_root,
                    start_new_session=True,
                )
            self._children[child.pid] = child
            started_at = time.time()
            atomic_write_json(
                files["pid"],
                {
                    "pid": child.pid,
                    "start_time": process_start_time(child.pid),
                    "started_at": started_at,
                    "leg": leg.leg,
                    "command": command,
                },
            )
            return LegHandle(leg=leg.leg, backend_id=f"pid:{child.pid}", started_at=started_at)

    async def observe(self, leg: LegSpec) -> LegObservation:
        return await asyncio.to_thread(self._observe, leg)

    def _observe(self, leg: LegSpec) -> LegObservation:
        self._reap()
        files = self._files(leg)
        record = _read(files["pid"])
        if record is None:
            return LegObservation(state=LegState.MISSING, detail="no such leg")
        ended = _read(files["exit"])
        if ended is not None:
            return LegObservation(state=LegState.TERMINATED, termination=self._termination(ended), detail="exited")
        if _alive(record):
            stalled = self._stalled(leg, record)
            if stalled is None:
                return LegObservation(state=LegState.RUNNING, detail=f"pid {record['pid']}")
            # Alive but silent (a hung trainer, a stuck mount): the same as a lost node, the next leg takes over.
            with suppress(ProcessLookupError):
                os.kill(record["pid"], signal.SIGKILL)  # the supervisor first, so it records nothing of its own
            self._kill_orphan(files)
            ended = {
                "signal": signal.SIGKILL,
                "reason": "ProgressStalled",
                "message": stalled,
                "disrupted": True,
                "ended_at": time.time(),
            }
            atomic_write_json(files["exit"], ended)
            return LegObservation(state=LegState.TERMINATED, termination=self._termination(ended), detail="stalled")
        ended = _read(files["exit"])  # it may have finished between the two reads
        if ended is not None:
            return LegObservation(state=LegState.TERMINATED, termination=self._termination(ended), detail="exited")
        # The supervisor vanished without a word (SIGKILLed, machine crash): the leg is lost.
        self._kill_orphan(files)
        lost = {
            "signal": signal.SIGKILL,
            "reason": "Lost",
            "message": "leg supervisor vanished without an exit record",
            "disrupted": True,
            "ended_at": time.time(),
        }
        atomic_write_json(files["exit"], lost)
        return LegObservation(state=LegState.TERMINATED, termination=self._termination(lost), detail="lost")

    def _stalled(self, leg: LegSpec, record: dict[str, Any]) -> str | None:
        """Why a live leg counts as stalled (its progress.json has not changed for retries.progressStallSeconds
        since the leg started), or None."""
        limit = leg.spec.retries.progress_stall_seconds
        progress = load_progress(self._layout(leg.namespace, leg.name))
        started = float(record.get("started_at") or 0.0)
        last = max(started, (progress.updated_at or 0.0) if progress is not None else 0.0)
        silent = time.time() - last
        if silent < limit:
            return None
        step = progress.step if progress is not None and (progress.updated_at or 0.0) >= started else None
        at = f"step {step}" if step is not None else "its start"
        return f"ProgressStalled: no progress for {silent:.0f}s (progressStallSeconds {limit:g}) since {at}"

    @staticmethod
    def _termination(ended: dict[str, Any]) -> LegTermination:
        return LegTermination(
            exit_code=ended.get("exit_code"),
            signal=ended.get("signal"),
            reason=str(ended.get("reason", "")),
            message=str(ended.get("message", "")),
            disrupted=bool(ended.get("disrupted", False)),
        )

    def _kill_orphan(self, files: dict[str, Path]) -> None:
        trainer = _read(files["trainer"])
        if _alive(trainer):
            assert trainer is not None
            with suppress(ProcessLookupError):
                os.kill(trainer["pid"], signal.SIGKILL)

    async def wait_for_change(self, leg: LegSpec, timeout_s: float) -> LegObservation:
        """Poll (cheaply: one stat) until the exit file appears, the process vanishes, or timeout_s passes."""
        files = self._files(leg)
        record = _read(files["pid"])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._reap()
            if files["exit"].exists() or not _alive(record):
                break
            await asyncio.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
        return await self.observe(leg)

    async def stop(self, leg: LegSpec, grace_s: float) -> LegObservation:
        files = self._files(leg)
        record = _read(files["pid"])
        if record is None:
            return LegObservation(state=LegState.MISSING, detail="no such leg")
        if _alive(record) and not files["exit"].exists():
            with suppress(ProcessLookupError):
                os.kill(record["pid"], signal.SIGTERM)  # the supervisor forwards it to the trainer
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and _alive(record) and not files["exit"].exists():
                self._reap()
                await asyncio.sleep(_POLL_S)
            if _alive(record) and not files["exit"].exists():
                self._kill_group(record)
                killed = {
                    "signal": signal.SIGKILL,
                    "reason": "Killed",
                    "message": f"did not exit within the {grace_s:g}s grace period after SIGTERM",
                    "ended_at": time.time(),
                }
                await asyncio.sleep(_POLL_S)
                self._reap()
                if not files["exit"].exists():
                    atomic_write_json(files["exit"], killed)
        return await self.observe(leg)

    def _kill_group(self, record: dict[str, Any]) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(record["pid"], signal.SIGKILL)  # supervisor and trainer share the leg's session

    async def cleanup(self, namespace: str, name: str) -> None:
        legs_dir = self._layout(namespace, name).legs_dir
        killed = []
        for path in legs_dir.glob("*.pid.json") if legs_dir.is_dir() else []:
            record = _read(path)
            if _alive(record):
                assert record is not None
                self._kill_group(record)
                killed.append(record)
        deadline = time.monotonic() + 5.0
        while any(_alive(record) for record in killed) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)  # SIGKILL is delivered asynchronously; wait until they are gone
            self._reap()

    async def predict(self, job: PredictJob) -> list[Prediction]:
        await asyncio.to_thread(prepare_predict_work, self.volume_root, job)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **self.extra_env}
        process = await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "trainer",
            *job.trainer_args(str(self.volume_root)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self.volume_root,
            start_new_session=True,
        )
        try:
            try:
                async with asyncio.timeout(job.timeout_s):  # not wait_for: see controller.waiting
                    _, stderr = await process.communicate()
            except TimeoutError:
                raise PredictFailed(
                    f"trainer predict did not finish within {job.timeout_s:g}s", non_retryable=True
                ) from None
            lines = stderr.decode(errors="replace").strip().splitlines()
            code = process.returncode if process.returncode is not None else -1
            return await asyncio.to_thread(
                read_predictions, self.volume_root, job, code, lines[-1] if lines else "no output"
            )
        finally:
            if process.returncode is None:  # timed out or cancelled: no predict process outlives the request
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            await asyncio.to_thread(remove_predict_work, self.volume_root, job)

    def log_tail(self, leg: LegSpec) -> str:
        return last_log_line(self._files(leg)["log"])
