"""The sweep's trial activities on Kubernetes: each trial is a TrainingRun owned by its TrainingSweep.

`start_trial` creates the trial's TrainingRun (ownerReferences: the sweep, so deleting the sweep deletes its
trials; label relay.dev/sweep) and the operator starts its training workflow as for any TrainingRun, under
the same id; `signal_trial` patches its spec.suspend (the operator signals pause/resume); `cancel_trial`
deletes it (the operator cancels the workflow and removes its Jobs); `publish_status` writes the sweep's
`.status` and posts an Event for each change since the stored one (`controller.sweep.events`). Watching a
trial is the local activity's: the eval lines on the shared volume and the workflow's state in Temporal.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from controller.kubernetes.status_sink import event_manifest
from controller.messages import ResumeRequest
from controller.spec import API_GROUP, API_VERSION, KIND, PLURAL, WORKFLOW_ID_PREFIX
from controller.sweep.activities import SweepActivities
from controller.sweep.events import SweepEvent, sweep_events
from controller.sweep.messages import (
    PublishSweepStatusRequest,
    StartTrialRequest,
    TrialRef,
    TrialSignalRequest,
    WatchTrialRequest,
)
from controller.sweep.spec import SWEEP_KIND, SWEEP_PLURAL, SweepStatus

SWEEP_LABEL = "relay.dev/sweep"
log = logging.getLogger("relay.sweep")


def trial_manifest(request: StartTrialRequest) -> dict[str, Any]:
    """The trial's TrainingRun: the run input's spec, owned by the sweep (when its uid is known)."""
    run = request.run_input
    metadata: dict[str, Any] = {
        "name": run.name,
        "namespace": run.namespace,
        "labels": {SWEEP_LABEL: request.sweep_name},
    }
    if request.sweep_uid:
        metadata["ownerReferences"] = [
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": SWEEP_KIND,
                "name": request.sweep_name,
                "uid": request.sweep_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    spec = run.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}


class KubernetesTrialActivities(SweepActivities):
    """SweepActivities whose trials are TrainingRun objects; the operator runs them."""

    def __init__(self, client: Client, volume_root: Path | str, api_client: kubernetes.client.ApiClient) -> None:
        super().__init__(client, volume_root)
        self.custom: Any = kubernetes.client.CustomObjectsApi(api_client)  # plain dicts in and out
        self.core: Any = kubernetes.client.CoreV1Api(api_client)

    @activity.defn(name="sweep_start_trial")
    async def start_trial(self, request: StartTrialRequest) -> None:
        """Create the trial's TrainingRun; one already there (a retried start) is kept."""
        body = trial_manifest(request)
        try:
            await asyncio.to_thread(
                self.custom.create_namespaced_custom_object, API_GROUP, API_VERSION, request.run_input.namespace,
                PLURAL, body,
            )  # fmt: skip
        except ApiException as exc:
            if exc.status != 409:
                raise

    @activity.defn(name="sweep_signal_trial")
    async def signal_trial(self, request: TrialSignalRequest) -> None:
        """spec.suspend true (pause) or false (resume) on the trial's TrainingRun; a deleted one needs nothing."""
        namespace, name = _namespace_and_name(request.workflow_id)
        patch = {"spec": {"suspend": request.signal == "pause"}}
        try:
            await asyncio.to_thread(
                self.custom.patch_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name, patch
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def _reconcile(self, request: WatchTrialRequest) -> None:
        """A watched trial whose TrainingRun says spec.suspend false but is Paused gets its resume directly.

        The sweep pauses a trial at its rung and may promote it a moment later: spec.suspend true then false within
        milliseconds, and the operator's spec.suspend handler can act on the first change and never on the second
        (seen on envtest: the run stayed Paused with spec.suspend false). The spec is the truth, so the watch,
        which polls the trial anyway, resumes it (idempotent: the workflow ignores a resume when not paused).
        """
        try:
            run = await asyncio.to_thread(
                self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, request.namespace, PLURAL,
                request.name,
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        if run.get("spec", {}).get("suspend") or (run.get("status") or {}).get("phase") != "Paused":
            return
        log.info("%s/%s: Paused with spec.suspend false; resuming it", request.namespace, request.name)
        resume = ResumeRequest(reason="spec.suspend is false (sweep)")
        try:
            await self.client.get_workflow_handle(request.workflow_id).signal("resume", resume)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise

    @activity.defn(name="sweep_cancel_trial")
    async def cancel_trial(self, request: TrialRef) -> bool:
        """Delete the trial's TrainingRun; False when its workflow had already ended (the run is kept then)."""
        namespace, name = _namespace_and_name(request.workflow_id)
        try:
            finished = (await self.client.get_workflow_handle(request.workflow_id).describe()).status
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            finished = None
        if finished is not None and finished != WorkflowExecutionStatus.RUNNING:
            return False
        try:
            await asyncio.to_thread(
                self.custom.delete_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            return False
        return True

    @activity.defn(name="sweep_publish_status")
    async def publish_status(self, request: PublishSweepStatusRequest) -> None:
        """The TrainingSweep's .status (kubectl get's columns), if the object is still the sweep's (same uid)."""
        try:
            current = await asyncio.to_thread(
                self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, request.namespace, SWEEP_PLURAL,
                request.name,
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted: its workflow is being cancelled
            raise
        if request.owner_uid and current["metadata"]["uid"] != request.owner_uid:
            return  # a newer object of the same name: not this workflow's to describe
        body = {"status": request.status.model_dump(mode="json", by_alias=True)}
        await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object_status, API_GROUP, API_VERSION, request.namespace,
            SWEEP_PLURAL, request.name, body,
        )  # fmt: skip
        try:
            stored = SweepStatus.model_validate(current.get("status") or {}) if current.get("status") else None
        except ValidationError:
            stored = None  # an older controller's status: every event once more is the lesser harm
        for event in sweep_events(stored, request.status):
            await self._emit(current, event)

    async def _emit(self, sweep: dict[str, Any], event: SweepEvent) -> None:
        """One core/v1 Event on the TrainingSweep; one that cannot be posted is logged, the status stands."""
        metadata = sweep["metadata"]
        body = event_manifest(
            SWEEP_KIND, metadata["namespace"], metadata["name"], metadata["uid"],
            event_type=event.type, reason=event.reason, message=event.message,
        )  # fmt: skip
        try:
            await asyncio.to_thread(self.core.create_namespaced_event, metadata["namespace"], body)
        except ApiException as exc:
            log.warning("%s/%s: event %s not posted: %s", metadata["namespace"], metadata["name"], event.reason, exc)


def _namespace_and_name(workflow_id: str) -> tuple[str, str]:
    """ "trainingrun-<ns>.<name>" back into (ns, name): DNS labels have no '.'."""
    namespace, _, name = workflow_id.removeprefix(WORKFLOW_ID_PREFIX).partition(".")
    return namespace, name
