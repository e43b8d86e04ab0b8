"""`relay sweep FILE`, `relay status NAME --sweep`, `relay plot NAME --sweep` and `relay validate` of a sweep file.

The sweep runs like `relay run`: an embedded Temporal dev server when none answers, a worker with the local
backend in this process, the sweep workflow and its trials' training workflows on one task queue, and a line
per change of the trials' counts until the sweep ends; then the trials table and the best trial.
`controller.cli` hands in its helpers (the Temporal context, the volume check, the error type), so the
commands behave as its own do: one line per expected error, exit 2 for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.sweep.spec import (
    InvalidTrainingSweep,
    SweepStatus,
    TrainingSweep,
    load_training_sweep,
    sweep_workflow_id,
)

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def is_sweep_file(path: str) -> bool:
    """Whether a YAML/JSON file says `kind: TrainingSweep` (unreadable files are left to the TrainingRun path)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(document, dict) and document.get("kind") == "TrainingSweep"


def validate(path: str) -> int:
    try:
        sweep = load_training_sweep(path)
    except InvalidTrainingSweep as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    spec = sweep.spec
    asha = f", ASHA rungs {spec.asha.rungs.steps} to {spec.asha.max_steps}" if spec.asha else ""
    print(
        f"{path}: valid TrainingSweep {sweep.metadata.namespace}/{sweep.metadata.name} "
        f"({len(spec.assignments())} trials, {spec.max_concurrent_trials} at once{asha})"
    )
    return EXIT_OK


def format_counts(status: SweepStatus) -> str:
    parts = [
        f"{status.phase:<9}",
        f"trials {status.trial_count}",
        f"running {status.running}",
        f"waiting {status.waiting}",
        f"pruned {status.pruned}",
        f"completed {status.completed}",
    ]
    if status.failed:
        parts.append(f"failed {status.failed}")
    if status.best_text:
        parts.append(f"best {status.best_text}")
    return "  ".join(parts)


def format_table(status: SweepStatus, metric: str) -> str:
    """The trials table: name, state, step, the objective, promotions, field values."""
    rows = [("TRIAL", "STATE", "STEP", metric.upper(), "RESUMES", "PARAMS")]
    for trial in status.trials:
        params = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(trial.params.items()))
        value = f"{trial.metric:.4f}" if trial.metric is not None else "-"
        rows.append((trial.name, trial.state, str(trial.step), value, str(trial.resumes), params))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]  # fmt: skip
    best = status.best
    if best is not None:
        where = f"; model {best.model_path}" if best.model_path else ""
        lines.append(f"best: {best.name} {best.metric} {best.value:.4f} at step {best.step}{where}")
    return "\n".join(line.rstrip() for line in lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


async def run_sweep(
    args: argparse.Namespace,
    temporal: Callable[..., Any],
    volume: Callable[..., Path],
    error: Callable[[str, int], Exception],
) -> int:
    """`relay sweep FILE`: run the sweep on the embedded server with a local worker; exit 0 when it succeeded."""
    from temporalio.client import WorkflowFailureError
    from temporalio.common import WorkflowIDConflictPolicy

    from controller.backends.local import LocalBackend
    from controller.sweep.messages import SWEEP_WORKFLOW, SweepInput
    from controller.worker import build_worker

    try:
        sweep = load_training_sweep(args.file)
    except InvalidTrainingSweep as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    volume_root = volume(args.volume, create=True)
    _check_dataset(sweep, volume_root, error)
    namespace, name = sweep.metadata.namespace, sweep.metadata.name
    wf_id = sweep_workflow_id(namespace, name)
    backend = LocalBackend(volume_root)
    async with (
        temporal(args.address, volume_root, embedded=True) as (client, ui_address),
        build_worker(client, backend, volume_root, task_queue=args.task_queue),
    ):
        handle = await client.start_workflow(
            SWEEP_WORKFLOW,
            SweepInput(
                namespace=namespace,
                name=name,
                spec=sweep.spec,
                trial_task_queue=args.task_queue,
                trial_await_window_s=2.0,
                trial_poll_interval_s=0.5,
                trial_heartbeat_timeout_s=10.0,
                watch_poll_interval_s=0.5,
            ),
            id=wf_id,
            task_queue=args.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            result_type=SweepStatus,
        )
        print(f"TrainingSweep {namespace}/{name}: workflow {wf_id} (volume {volume_root})", file=sys.stderr)
        print(f"  Web UI: {ui_address}/namespaces/default/workflows/{wf_id}", file=sys.stderr)
        result_task = asyncio.ensure_future(handle.result())
        try:
            await _watch(handle, result_task, show=not args.no_progress)
        except (KeyboardInterrupt, asyncio.CancelledError):
            with contextlib.suppress(OSError):  # after a hang-up there is no terminal to tell
                print("\ninterrupted: trials' legs stop at a checkpoint; `relay sweep` again goes on", file=sys.stderr)
            result_task.cancel()  # the dev server stops with us: its answer would be an error nobody reads
            await _stop_trial_legs(backend, sweep)
            return EXIT_INTERRUPTED
        failed = False
        try:
            status = await result_task
        except WorkflowFailureError:
            failed = True
            status = await handle.query("get_status", result_type=SweepStatus)
    print(f"\n{status.phase}: {status.message}")
    print(format_table(status, sweep.spec.objective.metric))
    return EXIT_ERROR if failed or status.phase != "Succeeded" else EXIT_OK


def _check_dataset(sweep: TrainingSweep, volume_root: Path, error: Callable[[str, int], Exception]) -> None:
    dataset = sweep.spec.template.dataset
    if dataset.source in ("csv", "jsonl", "parquet") and dataset.path and not (volume_root / dataset.path).is_file():
        raise error(
            f"spec.template.dataset.path {dataset.path!r}: no such file under the volume {volume_root}",
            EXIT_BAD_INPUT,
        )


async def _watch(handle: Any, result_task: asyncio.Future[Any], *, show: bool) -> None:
    """A line each time the trials' counts or the best change, until the sweep ends; without `show`, only wait."""
    from temporalio.client import WorkflowQueryFailedError
    from temporalio.service import RPCError

    if not show:
        await asyncio.wait({result_task})
        return
    last = ""
    while not result_task.done():
        with contextlib.suppress(RPCError, WorkflowQueryFailedError):  # a transient miss: the next tick tries again
            line = format_counts(await handle.query("get_status", result_type=SweepStatus))
            if line != last:
                try:
                    print(line, file=sys.stderr, flush=True)
                except OSError:  # the terminal is gone (hung up, its SIGHUP on the way): print nothing more
                    await asyncio.wait({result_task})
                    return
                last = line
        await asyncio.wait({result_task}, timeout=1.0)


async def _stop_trial_legs(backend: Any, sweep: TrainingSweep) -> None:
    from controller.leg_model import LegSpec
    from controller.sweep.spec import trial_name

    namespace = sweep.metadata.namespace
    grace = float(sweep.spec.template.termination_grace_period_seconds)
    for index, params in enumerate(sweep.spec.assignments()):
        name = trial_name(sweep.metadata.name, index)
        spec = sweep.spec.trial_spec(params)
        for leg in backend.alive_legs(namespace, name):
            ref = LegSpec(namespace=namespace, name=name, leg=leg, run_path="", snapshot_path="", spec=spec)
            await backend.stop(ref, grace)


async def show_status(
    args: argparse.Namespace, temporal: Callable[..., Any], embedded: bool, error: Callable[[str, int], Exception]
) -> int:
    """`relay status NAME --sweep`: the sweep workflow's get_status, as a table or JSON."""
    status = await query_status(args, temporal, embedded, error)
    if args.json:
        print(json.dumps(status.model_dump(mode="json", by_alias=True), indent=2))
    else:
        print(format_counts(status))
        print(f"{status.phase}: {status.message}")
        metric = status.best.metric if status.best else "metric"
        print(format_table(status, metric))
    return EXIT_OK


async def plot(
    args: argparse.Namespace, temporal: Callable[..., Any], embedded: bool, error: Callable[[str, int], Exception]
) -> int:
    """`relay plot NAME --sweep -o sweep.png`: every trial's eval metric against step (controller.sweep.plot)."""
    from controller.sweep.plot import plot_sweep

    status = await query_status(args, temporal, embedded, error)
    plot_sweep(status, Path(args.volume).expanduser(), args.namespace, args.name, Path(args.output))
    print(f"wrote {args.output}", file=sys.stderr)
    return EXIT_OK


async def query_status(
    args: argparse.Namespace, temporal: Callable[..., Any], embedded: bool, error: Callable[[str, int], Exception]
) -> SweepStatus:
    """The sweep's get_status, from the server at --address or the embedded one (its db on --volume)."""
    from temporalio.client import WorkflowQueryFailedError
    from temporalio.service import RPCError
    from temporalio.worker import Worker

    from controller.worker import TASK_QUEUE, WORKFLOWS

    volume_root = Path(args.volume).resolve() if (Path(args.volume) / "temporal.db").is_file() else None
    wf_id = sweep_workflow_id(args.namespace, args.name)
    async with temporal(args.address, volume_root, embedded=True) as (client, _):
        # On the embedded server nobody else runs a worker: a workflows-only one answers the query.
        query_worker = Worker(client, task_queue=TASK_QUEUE, workflows=WORKFLOWS) if embedded else None
        async with query_worker or contextlib.nullcontext():
            try:
                status = await client.get_workflow_handle(wf_id).query("get_status", result_type=SweepStatus)
            except RPCError as exc:
                raise error(f"no TrainingSweep {args.namespace}/{args.name} ({exc.message})", EXIT_ERROR) from None
            except WorkflowQueryFailedError as exc:  # e.g. a history this code cannot replay
                raise error(f"TrainingSweep {args.namespace}/{args.name}: no status ({exc})", EXIT_ERROR) from None
    return status
