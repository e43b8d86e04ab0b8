"""Find a TrainingRun's training workflow in Temporal, and tell whether it is that object's.

A workflow id alone proves nothing: ids before issue 11 (`controller.spec.legacy_workflow_id`) were shared
by `team/a-x` and `team-a/x`, and anyone who can reach Temporal can start a workflow under any id. What
ties a workflow to a TrainingRun is its input: namespace, name and `owner_uid` (the object's
metadata.uid), read from the first event of the newest execution's history (continue-as-new hands the
same three on). `find_run_workflow` looks at the current id first, then the legacy one, and returns only
an execution whose input names this run; with a uid it must be this object's uid too. Temporal only,
no Kubernetes: the operator and `relay status / pause / resume` share it.
"""

from __future__ import annotations

from dataclasses import dataclass

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from controller.messages import TrainingRunInput
from controller.spec import legacy_workflow_id, workflow_id


@dataclass(frozen=True)
class RunWorkflow:
    """One execution found under a run's id, with the identity its input claims (None: not a TrainingRunInput)."""

    workflow_id: str
    run_id: str
    running: bool
    namespace: str | None
    name: str | None
    owner_uid: str | None

    def belongs_to(self, namespace: str, name: str, uid: str | None) -> bool:
        """True when the input names `namespace/name` and, when `uid` is given, that object's uid."""
        same_run = (self.namespace, self.name) == (namespace, name)
        return same_run and (uid is None or self.owner_uid == uid)

    def handle(self, client: Client) -> WorkflowHandle[object, object]:
        """The newest execution under this id (signals and cancellation follow continue-as-new)."""
        return client.get_workflow_handle(self.workflow_id)


async def describe_run_workflow(client: Client, wf_id: str) -> RunWorkflow | None:
    """The newest execution under `wf_id` and the identity in its input; None when there is none."""
    handle = client.get_workflow_handle(wf_id)
    try:
        description = await handle.describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    run_input: TrainingRunInput | None = None
    run_handle = client.get_workflow_handle(wf_id, run_id=description.run_id)
    async for event in run_handle.fetch_history_events(page_size=1):
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            payloads = event.workflow_execution_started_event_attributes.input.payloads
            try:
                decoded = await client.data_converter.decode(payloads, [TrainingRunInput])
                run_input = decoded[0] if decoded and isinstance(decoded[0], TrainingRunInput) else None
            except Exception:  # the converter raises what it likes; an undecodable input is nobody's run
                run_input = None
        break
    return RunWorkflow(
        workflow_id=wf_id,
        run_id=description.run_id,
        running=description.status == WorkflowExecutionStatus.RUNNING,
        namespace=run_input.namespace if run_input else None,
        name=run_input.name if run_input else None,
        owner_uid=run_input.owner_uid if run_input else None,
    )


async def find_run_workflow(client: Client, namespace: str, name: str, uid: str | None) -> RunWorkflow | None:
    """The execution of TrainingRun `namespace/name` (and `uid`, when given) under its id or its legacy id.

    The legacy id is a fallback for runs a controller before issue 11 started: it is returned only when its
    input names this very run, so `team-a/x` never finds (nor cancels) `team/a-x`'s workflow.
    """
    for wf_id in (workflow_id(namespace, name), legacy_workflow_id(namespace, name)):
        found = await describe_run_workflow(client, wf_id)
        if found is not None and found.belongs_to(namespace, name, uid):
            return found
    return None
