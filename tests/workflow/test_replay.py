"""Replay recorded histories against today's workflow code: a non-deterministic change fails here, not in production.

The histories were recorded with tests/workflow/record_histories.py (see its docstring before re-recording).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from controller.sweep.spec import sweep_workflow_id
from controller.worker import WORKFLOW_RUNNER, WORKFLOWS

pytestmark = pytest.mark.anyio
HISTORIES = sorted((Path(__file__).resolve().parent / "histories").glob("*.json"))
EXPECTED = {
    "cancelled",
    "continue-as-new",
    "injected-preemption",
    "invalid-input",
    "pause-resume",
    "preempted-failed-completed",
    "sweep-asha",  # TrainingSweepWorkflow: ASHA's pauses, promotions and pruning, a suspend and resume
}


def test_every_recorded_path_is_present():
    assert {path.stem for path in HISTORIES} == EXPECTED


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replays_without_nondeterminism(path: Path):
    workflow_id = sweep_workflow_id("default", path.stem) if path.stem.startswith("sweep-") else None
    history = WorkflowHistory.from_json(
        workflow_id or f"trainingrun-default-{path.stem}", path.read_text(encoding="utf-8")
    )
    assert len(history.events) > 10  # a real history, not an empty file
    replayer = Replayer(  # the production worker's sandbox: what it refuses or re-imports, the replay does too
        workflows=WORKFLOWS,  # training, inference and sweep
        data_converter=pydantic_data_converter,
        workflow_runner=WORKFLOW_RUNNER,
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"
