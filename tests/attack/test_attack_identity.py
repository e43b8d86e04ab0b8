"""Attack tier, issue 11 item 1: workflow ids that collide, and adoption by id alone.

Finding: `team/a-x` and `team-a/x` both became `trainingrun-team-a-x`, so deleting `team-a/x` cancelled
`team/a-x`. Ids are now injective, and a run under the legacy id is found only when its input names the run.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from controller.messages import TrainingRunInput
from controller.run_workflows import describe_run_workflow, find_run_workflow
from controller.spec import WORKFLOW_ID_PREFIX, TrainingRunSpec, legacy_workflow_id, workflow_id


def spec() -> TrainingRunSpec:
    return TrainingRunSpec.model_validate({"dataset": {"source": "demo"}})


DNS_LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)


def test_the_reported_pair_no_longer_shares_an_id() -> None:
    """team/a-x and team-a/x: one id each (the legacy scheme gave both trainingrun-team-a-x)."""
    assert legacy_workflow_id("team", "a-x") == legacy_workflow_id("team-a", "x")
    assert workflow_id("team", "a-x") != workflow_id("team-a", "x")


@given(DNS_LABEL, DNS_LABEL)
def test_workflow_ids_split_back_into_the_one_namespace_and_name(namespace: str, name: str) -> None:
    """Injective: DNS labels hold no '.', so the id parses back to exactly (namespace, name)."""
    wf_id = workflow_id(namespace, name)
    assert wf_id.startswith(WORKFLOW_ID_PREFIX)
    assert tuple(wf_id.removeprefix(WORKFLOW_ID_PREFIX).split(".")) == (namespace, name)


async def _start_unserved(env: WorkflowEnvironment, wf_id: str, run_input: TrainingRunInput) -> WorkflowHandle:
    """A running execution nobody serves (its task queue has no worker): what an older controller left."""
    return await env.client.start_workflow(
        "CheckpointedBertTrainingWorkflow", run_input, id=wf_id, task_queue=f"nobody-{uuid.uuid4()}"
    )


@pytest.mark.anyio
async def test_a_legacy_workflow_is_found_only_by_the_run_and_uid_its_input_names(temporal_env: WorkflowEnvironment):
    """Adoption, deletion and `relay status` of team-a/x never reach team/a-x's legacy workflow."""
    team = f"team{uuid.uuid4().hex[:6]}"
    owner = TrainingRunInput(namespace=team, name="a-x", spec=spec(), owner_uid="uid-team")
    handle = await _start_unserved(temporal_env, legacy_workflow_id(team, "a-x"), owner)
    try:
        client = temporal_env.client
        found = await find_run_workflow(client, team, "a-x", "uid-team")
        assert found is not None and found.workflow_id == legacy_workflow_id(team, "a-x") and found.running
        assert await find_run_workflow(client, team, "a-x", None) is not None  # relay status: no uid to hand
        # The other run of the same legacy id, and a new object of the same name, find nothing to cancel.
        assert await find_run_workflow(client, f"{team}-a", "x", None) is None
        assert await find_run_workflow(client, f"{team}-a", "x", "uid-team") is None
        assert await find_run_workflow(client, team, "a-x", "uid-of-a-new-object") is None
    finally:
        await handle.terminate(reason="test over")


@pytest.mark.anyio
async def test_a_workflow_started_by_hand_under_the_id_is_not_the_objects(temporal_env: WorkflowEnvironment):
    """An execution under the current id whose input is another run's (or not a TrainingRunInput) is no match."""
    namespace, name = f"ns{uuid.uuid4().hex[:6]}", "victim"
    forged = TrainingRunInput(namespace="elsewhere", name=name, spec=spec(), owner_uid="uid-real")
    handle = await _start_unserved(temporal_env, workflow_id(namespace, name), forged)
    junk = await temporal_env.client.start_workflow(
        "CheckpointedBertTrainingWorkflow", "not an input", id=workflow_id(namespace, "junk"), task_queue="nobody"
    )
    try:
        described = await describe_run_workflow(temporal_env.client, workflow_id(namespace, name))
        assert described is not None and described.namespace == "elsewhere"
        assert not described.belongs_to(namespace, name, "uid-real")
        assert await find_run_workflow(temporal_env.client, namespace, name, "uid-real") is None
        undecodable = await describe_run_workflow(temporal_env.client, workflow_id(namespace, "junk"))
        assert undecodable is not None and undecodable.owner_uid is None
        assert not undecodable.belongs_to(namespace, "junk", None)
    finally:
        await handle.terminate(reason="test over")
        await junk.terminate(reason="test over")
