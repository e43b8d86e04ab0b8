"""`relay_list_s_500_runs`: wall time of the `relay list` command over 500 runs on a real dev server.

The dev server is started the way `relay run` starts it (controller.devserver, Relay's search attributes
registered). 500 training workflows are started with the memo and search attributes a run carries (no
worker: they wait for their first task, which changes nothing visibility shows), then `relay list
--address ...` runs as its own process, Python start and imports included, 3 times; the median is reported.
`python -m bench.bench_list` prints the entry as JSON. About 30 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from controller.devserver import DevServer
from controller.spec import workflow_id
from controller.status import Phase
from controller.visibility import (
    MEMO_KEY,
    SEARCH_ATTRIBUTES,
    TRAINING_WORKFLOW_TYPE,
    RunSummary,
    attribute_values,
)
from controller.worker import connect

REPO = Path(__file__).resolve().parents[1]
RUNS = 500
PHASES = (Phase.RUNNING, Phase.SUCCEEDED, Phase.FAILED, Phase.PAUSED)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _start_runs(client: Client, count: int) -> None:
    async def one(index: int) -> None:
        namespace, name = f"team-{index % 5}", f"bert-{index:04d}"
        summary = RunSummary(namespace=namespace, name=name, model="tiny", phase=PHASES[index % len(PHASES)],
                             step=index * 10, total_steps=6000, legs=1 + index % 4, preemptions=index % 3,
                             checkpoint_step=index * 10, started_at="2026-01-01T00:00:00Z")  # fmt: skip
        values = attribute_values(summary)
        attributes = TypedSearchAttributes([SearchAttributePair(key, values[key.name]) for key in SEARCH_ATTRIBUTES])
        await client.start_workflow(
            TRAINING_WORKFLOW_TYPE,
            {},  # never run: no worker polls this queue
            id=workflow_id(namespace, name),
            task_queue="bench-list-no-worker",
            memo={MEMO_KEY: summary},
            search_attributes=attributes,
        )

    for first in range(0, count, 50):
        await asyncio.gather(*(one(i) for i in range(first, min(count, first + 50))))
    for _ in range(600):
        if (await client.count_workflows(f'WorkflowType = "{TRAINING_WORKFLOW_TYPE}"')).count >= count:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"visibility did not show {count} runs within 60 s")


def _relay_list(address: str) -> tuple[float, int]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "controller.cli", "list", "--address", address, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=True,
    )
    return time.monotonic() - started, len(json.loads(done.stdout))


def run(out: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="relay-bench-list-") as scratch:
        server = DevServer(f"127.0.0.1:{_free_port()}", Path(scratch) / "temporal.db")
        with server:

            async def prepare() -> None:
                await _start_runs(await connect(server.address), RUNS)

            asyncio.run(prepare())
            timings = []
            for _ in range(3):
                seconds, listed = _relay_list(server.address)
                if listed != RUNS:
                    raise RuntimeError(f"relay list showed {listed} runs, not {RUNS}")
                timings.append(seconds)
    out["relay_list_s_500_runs"] = {
        "value": round(statistics.median(timings), 3),
        "unit": "s",
        "target": "<= 2",
        "method": f"`relay list --json` as a process (Python start included) over {RUNS} training workflows with "
        "memo and search attributes on a dev server started by controller.devserver (SQLite); median of 3 "
        f"({', '.join(f'{t:.2f}' for t in timings)} s)",
    }


if __name__ == "__main__":
    results: dict[str, Any] = {}
    run(results)
    print(json.dumps(results, indent=2))
