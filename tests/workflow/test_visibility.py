"""Search attributes, memo, `relay list` and `relay history` against real dev servers.

One dev server started the way `relay run` starts it (controller.devserver: the attributes registered at
start) and the session's server, started without them: a run there still succeeds, its starter warns, and
`relay list` finds it from the memo. The stories of the recorded histories are checked entry by entry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.client import Client, WorkflowHistory
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from workflow_fakes import ScriptedActivities, spec

from controller.devserver import DevServer
from controller.history import fetch_histories, replay, tell
from controller.messages import TrainingRunInput
from controller.spec import workflow_id
from controller.status import Phase
from controller.visibility import (
    RELAY_PHASE,
    RELAY_PREEMPTIONS,
    RELAY_STEP,
    compare_attributes,
    list_runs,
    start_attributes,
)
from controller.workflows import CheckpointedBertTrainingWorkflow

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]
HISTORIES = Path(__file__).resolve().parent / "histories"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
async def registered(anyio_backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """A client of a dev server started by controller.devserver, which registers Relay's attributes."""
    folder = tmp_path_factory.mktemp("devserver")
    server = DevServer(f"127.0.0.1:{_free_port()}", folder / "temporal.db", log_file=folder / "server.log")
    await asyncio.to_thread(server.start)
    try:
        yield await Client.connect(server.address, data_converter=pydantic_data_converter)
    finally:
        await asyncio.to_thread(server.stop)


async def relay(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "controller.cli", *args]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=90, cwd=REPO)


async def _run(client: Client, task_queue: str, namespace: str, name: str, outcomes: list[str], **kw: object):
    fakes = ScriptedActivities(outcomes)
    run_input = TrainingRunInput(namespace=namespace, name=name, spec=spec(), await_window_s=0.3,
                                 poll_interval_s=0.05, **kw)  # type: ignore[arg-type]  # fmt: skip
    async with Worker(client, task_queue=task_queue, workflows=[CheckpointedBertTrainingWorkflow],
                      activities=fakes.all()):  # fmt: skip
        handle = await client.start_workflow(
            CheckpointedBertTrainingWorkflow.run,
            run_input,
            id=workflow_id(namespace, name),
            task_queue=task_queue,
            search_attributes=await start_attributes(client, namespace, name, run_input.spec.model),
        )
        return handle, await handle.result()


def test_attribute_types_are_compared_and_a_wrong_one_is_named():
    keyword, integer = IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD, IndexedValueType.INDEXED_VALUE_TYPE_INT
    known = {"RelayNamespace": keyword, "RelayRun": keyword, "RelayPhase": keyword, "RelayModel": keyword}
    check = compare_attributes({**known, "RelayStep": keyword})
    assert check.problems == ("RelayStep is Keyword, not Int", "RelayPreemptions missing")
    assert [key.name for key in check.registered] == list(known)
    assert "temporal operator search-attribute create --namespace ml --name RelayStep --type Int" in check.message("ml")
    assert compare_attributes({**known, "RelayStep": integer, "RelayPreemptions": integer}).complete


async def test_a_run_is_found_by_its_attributes_listed_and_told(registered: Client, task_queue: str):
    name = f"vis-{uuid.uuid4().hex[:6]}"
    handle, final = await _run(registered, task_queue, "ml", name, ["preempted", "failed", "completed"])
    assert final.phase == Phase.SUCCEEDED
    attributes = (await handle.describe()).typed_search_attributes
    assert (attributes.get(RELAY_PHASE), attributes.get(RELAY_STEP), attributes.get(RELAY_PREEMPTIONS)) == (
        "Succeeded",
        30,
        1,
    )
    query = f'RelayPhase="Succeeded" AND RelayNamespace="ml" AND RelayRun="{name}"'
    for _ in range(50):  # visibility is eventually consistent
        found = [execution.id async for execution in registered.list_workflows(query)]
        if found:
            break
        await asyncio.sleep(0.1)
    assert found == [workflow_id("ml", name)]

    address = registered.service_client.config.target_host
    listed = await relay("list", "--address", address, "--run-namespace", "ml", "--phase", "Succeeded", "--json")
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout) if r.get("name") == name)
    assert (row["phase"], row["step"], row["totalSteps"], row["legs"], row["preemptions"]) == (
        "Succeeded",
        30,
        30,
        3,
        1,
    )
    assert row["checkpointStep"] == 30
    table = await relay("list", "--address", address, "--run-namespace", "ml")
    assert table.stdout.splitlines()[0].split() == [
        "NAMESPACE", "NAME", "PHASE", "STEP", "LEGS", "PREEMPTIONS", "CHECKPOINT", "AGE"
    ]  # fmt: skip
    assert any(line.split()[:5] == ["ml", name, "Succeeded", "30/30", "3"] for line in table.stdout.splitlines())

    told = await relay("history", name, "--namespace", "ml", "--address", address)
    assert told.returncode == 0, told.stderr
    for expected in ("leg 0: steps 0 -> 10, preempted", "LegFailed", "leg 2: steps 20 -> 30, completed",
                     "Resumed", "checkpoint step 30", "workflow completed", "replay: deterministic"):  # fmt: skip
        assert expected in told.stdout, expected
    unknown = await relay("history", "no-such-run", "--namespace", "ml", "--address", address)
    assert unknown.returncode == 1 and "trainingrun-ml.no-such-run" in unknown.stderr


async def test_history_reads_every_execution_after_continue_as_new(registered: Client, task_queue: str):
    name = f"can-{uuid.uuid4().hex[:6]}"
    _, final = await _run(registered, task_queue, "ml", name, ["preempted", "preempted", "completed"], legs_per_run=1)
    assert final.phase == Phase.SUCCEEDED
    histories = await fetch_histories(registered, workflow_id("ml", name))
    assert len(histories) == 3
    story = tell(histories)
    assert [e.kind for e in story].count("continued") == 2
    assert [e.text.split(",")[0] for e in story if e.kind == "leg"] == [
        "leg 0: steps 0 -> 10",
        "leg 1: steps 10 -> 20",
        "leg 2: steps 20 -> 30",
    ]
    assert story == sorted(story, key=lambda e: e.time)
    assert (await replay(histories)).ok


async def test_without_registered_attributes_the_run_succeeds_and_the_starter_warns(
    temporal_env: WorkflowEnvironment, task_queue: str, caplog: pytest.LogCaptureFixture
):
    name = f"plain-{uuid.uuid4().hex[:6]}"
    with caplog.at_level(logging.WARNING, logger="controller.visibility"):
        _, final = await _run(temporal_env.client, task_queue, "team", name, ["completed"])
    assert final.phase == Phase.SUCCEEDED
    assert "RelayPhase missing" in caplog.text and "temporal operator search-attribute create" in caplog.text
    for _ in range(50):
        runs = [r for r in await list_runs(temporal_env.client, run_namespace="team") if r.summary.name == name]  # type: ignore[union-attr]
        if runs and runs[0].phase() == "Succeeded":
            break
        await asyncio.sleep(0.1)
    assert runs[0].summary is not None and (runs[0].summary.step, runs[0].summary.legs) == (30, 1)


async def test_an_attribute_of_the_wrong_type_is_reported_and_left_alone(
    task_queue: str, caplog: pytest.LogCaptureFixture
):
    """A server where RelayStep is a Keyword: the warning names it, the run upserts the other five and succeeds."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
        ui=False,
        search_attributes=[SearchAttributeKey.for_keyword("RelayStep"), RELAY_PHASE],
    )
    try:
        with caplog.at_level(logging.WARNING, logger="controller.visibility"):
            handle, final = await _run(env.client, task_queue, "ml", "typed", ["completed"])
        assert final.phase == Phase.SUCCEEDED
        assert "RelayStep is Keyword, not Int" in caplog.text and "RelayNamespace missing" in caplog.text
        attributes = (await handle.describe()).typed_search_attributes
        assert attributes.get(RELAY_PHASE) == "Succeeded"
        assert attributes.get(SearchAttributeKey.for_keyword("RelayStep")) is None
    finally:
        await env.shutdown()


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("preempted-failed-completed", ["Preempted", "LegFailed", "Succeeded"]),
        ("pause-resume", ["signal pause (record)", "Paused", "signal resume", "Succeeded"]),
        ("cancelled", ["cancelled (workflow cancelled)", "workflow cancelled"]),
        ("continue-as-new", ["Preempted", "continued as new"]),
    ],
)
async def test_stories_of_recorded_histories(stem: str, expected: list[str]):
    history = WorkflowHistory.from_json(f"trainingrun-default-{stem}", (HISTORIES / f"{stem}.json").read_text())
    lines = [f"{entry.kind} {entry.text}" for entry in tell([history])]
    position = 0
    for text in expected:  # in this order
        position = next(i for i in range(position, len(lines)) if text in lines[i])
    assert (await replay([history])).ok
