"""Temporal activities of a TrainingRun: every side effect the workflow needs, as methods of one class.

`RelayActivities(backend, volume_root, status_sink)` is built by the worker with its dependencies:
a leg Backend (local processes or Kubernetes Jobs), the volume root as this process sees it, and a
StatusSink that publishes the run's status (the TrainingRun subresource + Events on Kubernetes, a
log line locally). It implements `controller.messages.RelayActivityInterface`, where the
activities' names and their request/result models live (the workflows import that module, not this
one). The controller only reads checkpoints (never quarantines or deletes them) and never imports
torch: predictions run the trainer through the backend (a local process, or a one-shot Job on
Kubernetes).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from temporalio import activity
from temporalio.exceptions import ApplicationError

from controller.backends.base import Backend, OwnerVerifying, PredictFailed, RunIdentityMismatch
from controller.leg_model import (
    LegObservation,
    LegOutcomeKind,
    LegState,
    LegTermination,
    PredictJob,
    classify_termination,
)
from controller.messages import (
    RUN_IDENTITY_MISMATCH,
    AwaitHeartbeat,
    AwaitLegRequest,
    AwaitLegResult,
    EvaluateResult,
    LaunchLegRequest,
    LaunchLegResult,
    LegProgress,
    PredictRequest,
    PredictResult,
    PrepareRunRequest,
    PrepareRunResult,
    PublishStatusRequest,
    RecordLegRequest,
    RelayActivityInterface,
    RunRef,
    SnapshotRequest,
    SnapshotResult,
    StopLegRequest,
)
from controller.spec import TrainingRunSpec, trainer_config
from controller.status import CheckpointStatus, LegStatus, QuarantinedStatus, RunEvent, RunStatus, rfc3339
from trainer import volume
from trainer.volume import ownership as volume_ownership
from trainer.volume.tenancy import ForeignPath, check_namespace_read, check_resolved_read

log = logging.getLogger(__name__)

# Workflow executions whose owner publish_status has verified, newest last: a few hundred bytes each, more than
# the runs one controller watches (500 were measured), so an active run is checked again only after 4096 others.
VERIFIED_RUNS_KEPT = 4096

# Error types the workflow treats as final (ApplicationError.type); also set non_retryable.
INVALID_DATASET = "InvalidDataset"
MISSING_FINAL_MODEL = "MissingFinalModel"
PREDICT_FAILED = "PredictFailed"


class StatusSink(Protocol):
    """Where the run's status goes: the TrainingRun .status + Events (Kubernetes) or a log (local)."""

    async def publish(self, namespace: str, name: str, status: RunStatus, events: list[RunEvent]) -> None: ...


class LogStatusSink:
    """The local sink: Events become log lines; the status itself is read through the get_status query."""

    async def publish(self, namespace: str, name: str, status: RunStatus, events: list[RunEvent]) -> None:
        for event in events:
            level = logging.WARNING if event.type == "Warning" else logging.INFO
            log.log(level, "%s/%s %s: %s", namespace, name, event.reason, event.message)


# ---------------------------------------------------------------- helpers


def estimate_total_steps(spec: TrainingRunSpec, train_rows: int) -> int:
    """Optimizer steps of the whole run: maxSteps, or epochs x ceil(micro-batches / accumulation)."""
    settings = spec.training
    if settings.max_steps is not None:
        return settings.max_steps
    micro_batches = math.ceil(train_rows / settings.batch_size)
    return settings.epochs * math.ceil(micro_batches / settings.gradient_accumulation_steps)


def _checkpoint_status(info: volume.CheckpointInfo, volume_root: Path) -> CheckpointStatus:
    loss = info.metrics.get("loss", info.metrics.get("train_loss"))
    try:
        rel = info.path.relative_to(volume_root).as_posix()
    except ValueError:
        rel = str(info.path)
    return CheckpointStatus(step=info.step, path=rel, created_at=rfc3339(info.created_at), loss=loss)


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_leg_progress(volume_root: Path, namespace: str, name: str) -> LegProgress:
    """Progress and newest checkpoint of a run, from the volume; cheap (sizes only, no hashing), read-only."""
    layout = volume.RunLayout.for_run(volume_root, namespace, name)
    latest, rejected = volume.find_latest_checkpoint(layout.checkpoints_dir, verify_hashes=False)
    progress = volume.load_progress(layout)  # typed (trainer.volume.records.Progress); None before the first report
    checkpoint = _checkpoint_status(latest, volume_root) if latest else None
    quarantined = [
        QuarantinedStatus(step=q.step, path=str(q.path), reason=q.reason)
        for q in volume.list_quarantined(layout.quarantine_dir)
    ] + [QuarantinedStatus(step=q.step, path=str(q.path), reason=f"unverified: {q.reason}") for q in rejected]
    checkpoint_step = checkpoint.step if checkpoint else 0
    if progress is None:
        epoch = latest.epoch if latest else 0
        return LegProgress(step=checkpoint_step, epoch=epoch, latest_checkpoint=checkpoint, quarantined=quarantined)
    return LegProgress(
        step=max(progress.step, checkpoint_step),
        total_steps=progress.total_steps,
        epoch=int(progress.epoch),
        loss=progress.loss,
        samples_per_second=progress.samples_per_s,
        eta_seconds=progress.eta_s,
        latest_checkpoint=checkpoint,
        quarantined=quarantined,
    )


def _describe_termination(termination: LegTermination) -> str:
    parts = []
    if termination.exit_code is not None:
        try:
            parts.append(f"exit {termination.exit_code} ({volume.ExitCode(termination.exit_code).name})")
        except ValueError:
            parts.append(f"exit {termination.exit_code}")
    if termination.signal is not None:
        parts.append(f"signal {termination.signal}")
    if termination.reason:
        parts.append(termination.reason)
    if termination.message:
        parts.append(termination.message)
    return ", ".join(parts) or "ended"


# ---------------------------------------------------------------- the activities


class RelayActivities(RelayActivityInterface):
    """The activities, bound to a backend, a volume root and a status sink."""

    def __init__(
        self,
        backend: Backend,
        volume_root: Path | str,
        status_sink: StatusSink | None = None,
    ) -> None:
        self.backend = backend
        self.volume_root = Path(volume_root).resolve()
        self.status_sink: StatusSink = status_sink or LogStatusSink()
        self._verified_runs: OrderedDict[str, str | None] = OrderedDict()  # workflow run id -> its owner uid

    def all(self) -> list[Any]:
        """Every activity callable, for Worker(activities=...)."""
        return [
            self.snapshot_dataset,
            self.prepare_run,
            self.launch_leg,
            self.await_leg,
            self.stop_leg,
            self.record_leg,
            self.publish_status,
            self.evaluate,
            self.predict,
            self.cleanup_run,
        ]

    async def _verify_owner(self, namespace: str, name: str, owner_uid: str | None) -> None:
        """Where runs have owners (Kubernetes), the TrainingRun must exist with this uid before anything is written."""
        if isinstance(self.backend, OwnerVerifying):
            try:
                await self.backend.verify_owner(namespace, name, owner_uid)
            except RunIdentityMismatch as exc:
                raise ApplicationError(str(exc), type=RUN_IDENTITY_MISMATCH, non_retryable=True) from None

    @activity.defn(name="snapshot_dataset")
    async def snapshot_dataset(self, request: SnapshotRequest) -> SnapshotResult:
        from controller import snapshot  # datasets/pyarrow: imported only where used

        await self._verify_owner(request.namespace, request.name, request.owner_uid)

        def checked_snapshot() -> tuple[Any, bool]:  # a namespace reads only its own prefix (issue 11)
            snapshot.check_namespace(self.volume_root, request.dataset, request.namespace)
            return snapshot.snapshot_dataset(self.volume_root, request.dataset, request.num_labels)

        work = asyncio.ensure_future(asyncio.to_thread(checked_snapshot))
        while not work.done():  # heartbeats: a lost worker is noticed in a minute, not after the 6 h timeout
            activity.heartbeat()
            await asyncio.wait({work}, timeout=5.0)
        try:
            info, reused = work.result()
        except snapshot.InvalidDataset as exc:
            raise ApplicationError(str(exc), type=INVALID_DATASET, non_retryable=True) from None
        return SnapshotResult(
            sha256=info.content_sha256,
            path=info.path.relative_to(self.volume_root).as_posix(),
            rows=info.rows,
            fields=info.fields,
            reused=reused,
        )

    @activity.defn(name="prepare_run")
    async def prepare_run(self, request: PrepareRunRequest) -> PrepareRunResult:
        """Write runs/<ns>/<name>/config.json (the resolved trainer config); report the newest checkpoint."""
        await self._verify_owner(request.namespace, request.name, request.owner_uid)
        layout = volume.RunLayout.for_run(self.volume_root, request.namespace, request.name)
        model = request.spec.model
        if model != "tiny" and "/" in model and (self.volume_root / model).exists():
            try:  # a model folder on the volume: a namespace trains only from its own or the shared area (issue 11)
                model = str(check_resolved_read(request.namespace, self.volume_root, model, "spec.model"))
            except ForeignPath as exc:
                raise ApplicationError(str(exc), type="ForeignPath", non_retryable=True) from None
        config = trainer_config(request.spec, model=model)
        text = config.to_json_text()

        def write_config_and_read_legs() -> tuple[Any, list[int], Path | None]:  # file work off the event loop
            # A new object of an old name starts from zero; its predecessor's folder is kept aside (issue 11).
            moved = volume_ownership.claim_run_dir(layout.run_dir, request.owner_uid) if request.owner_uid else None
            if not layout.config_path.is_file() or layout.config_path.read_text(encoding="utf-8") != text:
                layout.run_dir.mkdir(parents=True, exist_ok=True)
                volume.atomic_write_json(layout.config_path, json.loads(text))
            progress = read_leg_progress(self.volume_root, request.namespace, request.name)
            legs = [p.name.split(".")[0] for p in layout.legs_dir.glob("*.json")]
            return progress, [int(n) for n in legs if n.isdigit()], moved

        progress, numbers, moved = await asyncio.to_thread(write_config_and_read_legs)
        return PrepareRunResult(
            previous_run_path=moved.relative_to(self.volume_root).as_posix() if moved else None,
            next_leg=max(numbers, default=-1) + 1,
            run_path=volume.run_path(request.namespace, request.name),
            config_path=layout.config_path.relative_to(self.volume_root).as_posix(),
            total_steps=estimate_total_steps(request.spec, request.snapshot.rows.get("train", 0)),
            latest_checkpoint=progress.latest_checkpoint,
        )

    @activity.defn(name="launch_leg")
    async def launch_leg(self, request: LaunchLegRequest) -> LaunchLegResult:
        """Start leg n (or adopt it when it already runs) and write legs/<n>.json's start record.

        The backend checks the leg against its TrainingRun where there is one (Kubernetes); a mismatch creates
        nothing and fails non-retryably. Environment from the request never reaches a leg: only the backend's.
        """
        leg = request.leg.model_copy(update={"extra_env": {}})
        layout = volume.RunLayout.for_run(self.volume_root, leg.namespace, leg.name)
        record = await asyncio.to_thread(volume.read_leg_record, layout, leg.leg)
        start_step = record.start_step if record else 0
        if record is None:
            # Hash-verified, as the trainer will: a corrupt newer checkpoint is not where the leg resumes.
            # Read-only (no quarantine dir): moving it aside is the trainer's job.
            checkpoints = volume.RunLayout.for_run(self.volume_root, leg.namespace, leg.name).checkpoints_dir
            latest, _ = await asyncio.to_thread(volume.find_latest_checkpoint, checkpoints, verify_hashes=True)
            start_step = latest.step if latest else 0
        # Fencing (issue 13), in this one place for both backends: leg n's generation is written before it
        # launches, so a leg before it (on a lost node, say) commits nothing more to the run folder; the step
        # it resumes from is kept from retention. Never lowered; the same leg again leaves it as it is.
        await asyncio.to_thread(volume.write_fence, layout, leg.leg, start_step or None)
        try:
            handle = await self.backend.launch(leg)
        except RunIdentityMismatch as exc:
            raise ApplicationError(str(exc), type=RUN_IDENTITY_MISMATCH, non_retryable=True) from None
        started_at = rfc3339(handle.started_at)
        if record is None or record.backend_id != handle.backend_id:
            record = LegStatus(leg=leg.leg, start_step=start_step, started_at=started_at, backend_id=handle.backend_id)
            await asyncio.to_thread(volume.write_leg_record, layout, record)
        return LaunchLegResult(handle=handle, start_step=start_step, started_at=started_at)

    @activity.defn(name="await_leg")
    async def await_leg(self, request: AwaitLegRequest) -> AwaitLegResult:
        """Watch a leg for up to max_wait_s, heartbeating its progress; inject requested preemptions.

        Returns early when the leg ends. A retried attempt continues from the last heartbeat (an
        injected preemption is not sent twice).
        """
        leg = request.leg
        injected: int | None = None
        details = activity.info().heartbeat_details
        if details:
            try:
                injected = AwaitHeartbeat.model_validate(details[0]).injected_preempt_at
            except ValueError:
                injected = None
        deadline = time.monotonic() + request.max_wait_s
        stopper: asyncio.Task[LegObservation] | None = None
        while True:
            observation = await self.backend.observe(leg)
            progress = await asyncio.to_thread(read_leg_progress, self.volume_root, leg.namespace, leg.name)
            activity.heartbeat(AwaitHeartbeat(progress=progress, injected_preempt_at=injected))
            if observation.state == LegState.TERMINATED and observation.termination is not None:
                if stopper is not None:
                    await stopper
                return AwaitLegResult(
                    terminated=True,
                    outcome=classify_termination(observation.termination),
                    termination=observation.termination,
                    detail=_describe_termination(observation.termination),
                    progress=progress,
                    injected_preempt_at=injected,
                )
            if observation.state == LegState.MISSING:
                termination = LegTermination(reason="Missing", message="leg process is gone without a record")
                return AwaitLegResult(
                    terminated=True,
                    outcome=LegOutcomeKind.PREEMPTED,
                    termination=termination,
                    detail=_describe_termination(termination),
                    progress=progress,
                    injected_preempt_at=injected,
                )
            due = [s for s in request.preempt_at_steps if progress.step >= s]
            if injected is None and due and observation.state == LegState.RUNNING:
                injected = min(due)
                activity.heartbeat(AwaitHeartbeat(progress=progress, injected_preempt_at=injected))
                log.info("%s/%s: injecting a preemption at step %d (SIGTERM)", leg.namespace, leg.name, progress.step)
                # Stop in the background so that heartbeats go on during the grace period.
                stopper = asyncio.create_task(self.backend.stop(leg, request.grace_s))
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 and (stopper is None or stopper.done()):
                return AwaitLegResult(terminated=False, progress=progress, injected_preempt_at=injected)
            await self.backend.wait_for_change(leg, max(0.05, min(request.poll_interval_s, remaining)))

    @activity.defn(name="stop_leg")
    async def stop_leg(self, request: StopLegRequest) -> LegObservation:
        """SIGTERM the leg (it checkpoints and exits), SIGKILL after the grace period."""
        return await self.backend.stop(request.leg, request.grace_s)

    @activity.defn(name="record_leg")
    async def record_leg(self, request: RecordLegRequest) -> None:
        """Write legs/<n>.json: what the leg started from and how it ended."""
        layout = volume.RunLayout.for_run(self.volume_root, request.namespace, request.name)
        await asyncio.to_thread(volume.write_leg_record, layout, request.record)

    @activity.defn(name="publish_status")
    async def publish_status(self, request: PublishStatusRequest) -> None:
        """Hand status and events to the sink, once the execution is known to be its TrainingRun's (Kubernetes).

        A workflow started by hand once marked another run Failed and posted Warning Events on it. Checked once
        per workflow execution (its input never changes), not per publish: that would add an API GET to every
        status update (~17 a second at 500 runs). An execution whose object is replaced under the same name
        stays verified; its deletion cancels it.
        """
        run_id = activity.info().workflow_run_id or ""  # None only outside a workflow (ActivityEnvironment)
        if run_id not in self._verified_runs or self._verified_runs[run_id] != request.owner_uid:
            await self._verify_owner(request.namespace, request.name, request.owner_uid)
            self._verified_runs[run_id] = request.owner_uid
            while len(self._verified_runs) > VERIFIED_RUNS_KEPT:
                self._verified_runs.popitem(last=False)
        await self.status_sink.publish(request.namespace, request.name, request.status, request.events)

    @activity.defn(name="evaluate")
    async def evaluate(self, request: RunRef) -> EvaluateResult:
        """Verify final/ (manifest + hashes) and return the held-out metrics the trainer wrote there."""
        layout = volume.RunLayout.for_run(self.volume_root, request.namespace, request.name)
        final = layout.final_dir
        try:
            await asyncio.to_thread(volume.read_checkpoint, final, verify_hashes=True)
        except volume.CheckpointInvalid as exc:
            raise ApplicationError(f"final model: {exc}", type=MISSING_FINAL_MODEL, non_retryable=True) from None
        metrics_path = final / "metrics.json"
        try:
            raw = volume.read_json(metrics_path)
        except (OSError, ValueError) as exc:
            raise ApplicationError(
                f"{metrics_path}: unreadable ({exc})", type=MISSING_FINAL_MODEL, non_retryable=True
            ) from None
        if isinstance(raw, dict) and isinstance(raw.get("metrics"), dict):
            raw = raw["metrics"]
        metrics = {str(k): float(v) for k, v in dict(raw).items() if _float_or_none(v) is not None}
        stop_reason = raw.get("stop_reason") if isinstance(raw, dict) else None  # the trainer's EarlyStopped
        return EvaluateResult(
            metrics=metrics,
            model_path=final.relative_to(self.volume_root).as_posix(),
            stop_reason=stop_reason if isinstance(stop_reason, str) and stop_reason.isidentifier() else "",
        )

    @activity.defn(name="predict")
    async def predict(self, request: PredictRequest) -> PredictResult:
        """Check the model folder, then run `trainer predict` through the backend (heartbeating while it runs)."""
        rel = request.model_path or f"{volume.run_path(request.namespace, request.name)}/final"
        model = (self.volume_root / rel).resolve()
        if not model.is_relative_to(self.volume_root) or model == self.volume_root:
            raise ApplicationError(f"modelPath {rel!r}: escapes the volume", type=PREDICT_FAILED, non_retryable=True)
        try:  # symlinks resolved: a namespace predicts only with its own models (issue 11)
            check_namespace_read(request.namespace, model.relative_to(self.volume_root).as_posix(), "modelPath")
        except ForeignPath as exc:
            raise ApplicationError(str(exc), type=PREDICT_FAILED, non_retryable=True) from None
        if not model.is_dir():
            raise ApplicationError(f"{model}: no such model folder", type=MISSING_FINAL_MODEL, non_retryable=True)
        info = activity.info()
        request_id = hashlib.sha256(f"{info.workflow_id}/{info.activity_id}".encode()).hexdigest()[:8]
        work = f"{volume.run_path(request.namespace, request.name)}/predictions/{request_id}"
        reads = [p.relative_to(self.volume_root).as_posix() for p in volume.model_folders(model)]
        for read in reads:
            if read == work or read.startswith(work + "/") or work.startswith(read + "/"):
                message = f"modelPath {rel!r}: must be a model folder (final/ or checkpoints/step-N), not {read!r}"
                raise ApplicationError(message, type=PREDICT_FAILED, non_retryable=True)
        job = PredictJob(
            namespace=request.namespace,
            name=request.name,
            request_id=request_id,
            model_path=reads[0],
            read_paths=reads,
            work_path=work,
            texts=request.texts,
            timeout_s=request.timeout_s,
        )
        work_task = asyncio.ensure_future(self.backend.predict(job))
        try:
            while not work_task.done():  # a lost worker is noticed within the heartbeat timeout
                activity.heartbeat()
                await asyncio.wait({work_task}, timeout=5.0)
            predictions = work_task.result()
        except PredictFailed as exc:
            raise ApplicationError(str(exc), type=PREDICT_FAILED, non_retryable=exc.non_retryable) from None
        finally:
            if not work_task.done():  # cancelled: the backend stops the trainer and removes what it made
                work_task.cancel()
                await asyncio.wait({work_task})
        return PredictResult(model_path=rel, predictions=predictions)

    @activity.defn(name="cleanup_run")
    async def cleanup_run(self, request: RunRef) -> None:
        """Remove leftover leg objects of a finished run; checkpoints and the final model stay."""
        await self.backend.cleanup(request.namespace, request.name)
