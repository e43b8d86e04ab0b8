"""The operator's TrainingSweep handlers: start the sweep's workflow, pass spec.suspend on, cancel it on delete.

Thin, like the TrainingRun handlers: what the CRD schema cannot state is checked with the pydantic models (a
sweep that fails them gets phase Failed naming the field, and a Warning Event); a valid one starts
TrainingSweepWorkflow under "trainingsweep-<ns>.<name>" with the object's uid, whose trial activities
(controller.sweep.kubernetes) create the trials as TrainingRuns owned by the sweep, which the TrainingRun
handlers run. `register_sweep_handlers` adds the handlers to the operator's kopf registry.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from controller.spec import API_GROUP, API_VERSION
from controller.sweep.messages import SWEEP_WORKFLOW, SweepInput
from controller.sweep.spec import (
    SWEEP_PLURAL,
    InvalidTrainingSweep,
    SweepStatus,
    parse_training_sweep,
    sweep_workflow_id,
)

log = logging.getLogger("relay.sweep")
FINISHED = ("Succeeded", "Failed", "Cancelled")
WATCH_POLL_S = 5.0  # how often a trial's watch reads its eval lines on the volume


def register_sweep_handlers(registry: kopf.OperatorRegistry, temporal: Client, task_queue: str) -> None:
    resource = (API_GROUP, API_VERSION, SWEEP_PLURAL)

    async def start(body: kopf.Body, patch: kopf.Patch) -> None:
        if (body.get("status") or {}).get("phase") in FINISHED:
            return
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        document = {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in body}
        try:
            sweep = parse_training_sweep(document, "TrainingSweep")
        except InvalidTrainingSweep as exc:
            message = "; ".join(f"{field}: {text}" for field, text in exc.errors)
            log.warning("%s/%s is invalid: %s", namespace, name, message)
            patch.status.update(SweepStatus(phase="Failed", message=message).model_dump(mode="json", by_alias=True))
            kopf.warn(body, reason="Invalid", message=message)
            return
        sweep_input = SweepInput(
            namespace=namespace,
            name=name,
            spec=sweep.spec,
            owner_uid=str(body["metadata"]["uid"]),
            trial_task_queue=task_queue,
            watch_poll_interval_s=WATCH_POLL_S,
        )
        await temporal.start_workflow(
            SWEEP_WORKFLOW,
            sweep_input,
            id=sweep_workflow_id(namespace, name),
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        log.info("%s/%s: sweep workflow %s running", namespace, name, sweep_workflow_id(namespace, name))

    @kopf.on.create(*resource, registry=registry)
    async def on_create(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await start(body, patch)
        kopf.info(body, reason="Started", message="sweep workflow started; trials are TrainingRuns it owns")

    @kopf.on.resume(*resource, registry=registry)
    async def on_resume(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await start(body, patch)

    @kopf.on.field(*resource, field="spec.suspend", registry=registry)
    async def on_suspend(body: kopf.Body, old: Any, new: Any, **_: Any) -> None:
        if old is None and not new:
            return  # creation: the workflow reads spec.suspend from its input
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        # The value the object holds now (level), not the diff's: a retry after a TemporaryError may see a later
        # body, and pause/resume are idempotent in the workflow.
        wanted = bool(body["spec"].get("suspend"))
        handle = temporal.get_workflow_handle(sweep_workflow_id(namespace, name))
        try:
            await handle.signal("pause" if wanted else "resume")
        except RPCError as exc:
            raise kopf.TemporaryError(f"cannot signal the sweep's workflow yet: {exc}", delay=5) from exc
        kopf.info(body, reason="Suspended" if wanted else "Resumed", message=f"spec.suspend set to {wanted}")

    @kopf.on.delete(*resource, registry=registry)
    async def on_delete(body: kopf.Body, **_: Any) -> None:
        """Cancel the sweep's workflow: it cancels its trials (their TrainingRuns go with their owner too)."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            await temporal.get_workflow_handle(sweep_workflow_id(namespace, name)).cancel()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise kopf.TemporaryError(f"cannot cancel the sweep's workflow yet: {exc}", delay=5) from exc
