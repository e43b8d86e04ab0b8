"""The `relay` command line: run a TrainingRun locally, watch, pause, resume, predict, validate, list runs and tell a
run's history; host the operator.

`relay run FILE` is the quickstart: it validates the file, starts an embedded Temporal dev server
when none answers at --address, runs a worker with the local backend in-process, submits the run
and shows a live progress bar from the workflow's `get_status` query. `relay controller ...` hands
over to the Kubernetes operator (imported only then). Expected errors are one line on stderr, exit
code 2 for bad input and 1 for everything else, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from controller.spec import InvalidTrainingRun, TrainingRun, load_training_run, workflow_id

if TYPE_CHECKING:
    from trainer.volume import RunLayout

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# Besides Ctrl-C (SIGINT, which asyncio.run turns into the main task's cancellation), these end a command the same
# way: `kill`, a supervisor's stop and a closed terminal. Otherwise the process died where it stood and left its
# leg training and its embedded dev server running, both in sessions of their own.
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
DEFAULT_VOLUME = "./relay-volume"
DEFAULT_ADDRESS = "localhost:7233"


class CliError(Exception):
    """An expected failure: printed as one line 'relay: <message>', exit with `code`."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- shared helpers


def _volume(path: str, *, create: bool) -> Path:
    """The volume folder, checked writable (a probe file is created and removed)."""
    root = Path(path).expanduser()
    try:
        if create:
            root.mkdir(parents=True, exist_ok=True)
        if not root.is_dir():
            raise CliError(f"volume {path}: no such folder")
        with tempfile.NamedTemporaryFile(dir=root, prefix=".relay-probe-"):
            pass
    except OSError as exc:
        raise CliError(f"volume {path}: not writable ({exc.strerror or exc})") from None
    return root.resolve()


def _check_dataset(run: TrainingRun, volume_root: Path) -> None:
    """A file dataset must exist under the volume before anything starts."""
    dataset = run.spec.dataset
    if dataset.source in ("csv", "jsonl", "parquet") and dataset.path is not None:
        path = volume_root / dataset.path
        if not path.is_file():
            raise CliError(
                f"spec.dataset.path {dataset.path!r}: no such file under the volume {volume_root}", EXIT_BAD_INPUT
            )


def _default_ui(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"http://{host}:{int(port) + 1000}"  # the temporal CLI's default for its UI


@contextlib.asynccontextmanager
async def _temporal(address: str, volume_root: Path | None, *, embedded: bool) -> AsyncIterator[tuple[Any, str]]:
    """A connected client and the server's Web UI address; starts the embedded dev server (db on the volume)
    when nothing answers locally."""
    from temporalio.service import RPCError

    from controller import devserver, worker

    server = None
    try:
        reachable = devserver.reachable(address)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    if not reachable:
        if not (embedded and volume_root is not None and devserver.is_local(address)):
            hint = "is the server running? `relay run` starts one"
            if embedded and volume_root is not None:
                hint = "the embedded server is started only for a local address"
            raise CliError(f"cannot reach Temporal at {address} ({hint})")
        server = devserver.DevServer(address, volume_root / "temporal.db", log_file=volume_root / "temporal-server.log")
        try:
            await asyncio.to_thread(server.start)
        except devserver.DevServerError as exc:
            raise CliError(str(exc)) from None
        _note(f"started the embedded Temporal dev server at {address} (Web UI {server.ui_address})")
    ui_address = server.ui_address if server is not None else _default_ui(address)
    try:
        try:
            client = await worker.connect(address)
        except (RPCError, RuntimeError, OSError) as exc:
            raise CliError(f"cannot connect to Temporal at {address}: {exc}") from None
        yield client, ui_address
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)


def _reachable(address: str) -> bool:
    from controller.devserver import reachable

    try:
        return reachable(address)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None


def _note(message: str, stream: TextIO = sys.stderr) -> None:
    print(message, file=stream, flush=True)


def _fmt_status_line(status: Any, width: int = 28) -> str:
    total = status.total_steps or 0
    filled = int(width * status.progress) if total else 0
    bar = "#" * filled + "-" * (width - filled)
    parts = [f"[{bar}] {status.phase.value:<12}", f"step {status.step}/{total or '?'}"]
    if status.loss is not None:
        parts.append(f"loss {status.loss:.4f}")
    parts.append(f"legs {len(status.legs)}")
    parts.append(f"preemptions {status.preemptions}")
    if status.failures:
        parts.append(f"failures {status.failures}")
    if status.latest_checkpoint is not None:
        parts.append(f"ckpt step {status.latest_checkpoint.step}")
    return "  ".join(parts)


def _query_hint(wf_id: str, address: str) -> str:
    return f"temporal workflow query --address {address} --workflow-id {wf_id} --name get_status"


# ---------------------------------------------------------------- commands


def _cmd_validate(args: argparse.Namespace) -> int:
    from controller.sweep.cli import is_sweep_file, validate

    if is_sweep_file(args.file):  # kind: TrainingSweep
        return validate(args.file)
    run = load_training_run(args.file)
    if args.policy is not None:  # the cluster's allow-lists, as `relay controller --policy` enforces them
        from controller.policy import Policy, PolicyError, check_policy

        try:
            problems = check_policy(run.spec, Policy.from_json(args.policy))
        except PolicyError as exc:
            raise CliError(str(exc), EXIT_BAD_INPUT) from None
        if problems:
            raise InvalidTrainingRun(args.file, [(f, m) for f, _, m in (line.partition(": ") for line in problems)])
    print(f"{args.file}: valid TrainingRun {run.metadata.namespace}/{run.metadata.name}")
    return EXIT_OK


async def _cmd_run(args: argparse.Namespace) -> int:
    from temporalio.client import WorkflowFailureError, WorkflowQueryFailedError
    from temporalio.common import WorkflowIDConflictPolicy
    from temporalio.service import RPCError

    from controller.backends.local import LocalBackend, refuse_multinode
    from controller.visibility import start_attributes
    from controller.worker import build_worker
    from controller.workflows import TrainingRunInput

    run = load_training_run(args.file)
    refused = refuse_multinode(run.spec.resources)
    if refused:
        raise CliError(f"{args.file}: {refused}", EXIT_BAD_INPUT)
    if any(step <= 0 for step in args.preempt_at_step):
        raise CliError("--preempt-at-step: must be a positive step number", EXIT_BAD_INPUT)
    volume_root = _volume(args.volume, create=True)
    _check_dataset(run, volume_root)
    namespace, name = run.metadata.namespace, run.metadata.name
    wf_id = workflow_id(namespace, name)
    backend = LocalBackend(volume_root)
    async with _temporal(args.address, volume_root, embedded=True) as (client, ui_address):
        worker = build_worker(client, backend, volume_root, task_queue=args.task_queue)
        async with worker:
            handle = await client.start_workflow(
                "CheckpointedBertTrainingWorkflow",
                TrainingRunInput(
                    namespace=namespace,
                    name=name,
                    spec=run.spec,
                    preempt_at_steps=sorted(set(args.preempt_at_step)),
                    legs_per_run=20,
                    await_window_s=2.0,
                    poll_interval_s=0.5,
                    heartbeat_timeout_s=10.0,
                ),
                id=wf_id,
                task_queue=args.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                search_attributes=await start_attributes(client, namespace, name, run.spec.model),
            )
            _note(f"TrainingRun {namespace}/{name}: workflow {wf_id} (volume {volume_root})")
            _note(f"  status as JSON:  {_query_hint(wf_id, args.address)}")
            _note(f"  (legacy tctl:    tctl --address {args.address} workflow query --workflow_id {wf_id} "
                  "--query_type get_status)")  # fmt: skip
            _note(f"  Web UI:          {ui_address}/namespaces/default/workflows/{wf_id}")
            result_task = asyncio.ensure_future(handle.result())
            try:
                await _watch(handle, result_task, show=not args.no_progress)
            except (KeyboardInterrupt, asyncio.CancelledError):
                with contextlib.suppress(OSError):  # after a hang-up there is no terminal to tell
                    _note("\ninterrupted: stopping the running leg (it checkpoints); `relay run` again resumes")
                result_task.cancel()  # the dev server stops with us: its answer would be an error nobody reads
                for leg in backend.alive_legs(namespace, name):
                    await backend.stop(_leg_ref(run, leg), float(run.spec.termination_grace_period_seconds))
                return EXIT_INTERRUPTED
            failed = None
            try:
                await result_task
            except WorkflowFailureError as exc:
                failed = exc
            try:
                status = await handle.query("get_status", result_type=_status_type())
            except (RPCError, WorkflowQueryFailedError) as exc:
                raise CliError(f"the run ended but its status could not be read: {exc}") from None
    _print_summary(status, volume_root, failed is not None)
    return EXIT_OK if failed is None else EXIT_ERROR


async def _cmd_sweep(args: argparse.Namespace) -> int:
    from controller.sweep.cli import run_sweep

    return await run_sweep(args, _temporal, _volume, CliError)


def _status_type() -> type:
    from controller.status import RunStatus

    return RunStatus


def _leg_ref(run: TrainingRun, leg: int) -> Any:
    from controller.leg_model import LegSpec

    namespace, name = run.metadata.namespace, run.metadata.name
    return LegSpec(namespace=namespace, name=name, leg=leg, run_path="", snapshot_path="", spec=run.spec)


async def _watch(handle: Any, result_task: asyncio.Future[Any], *, show: bool) -> None:
    """Redraw a one-line progress bar from get_status until the workflow ends; without `show`, only wait for it
    (a query a second costs the server and the worker CPU that the leg's training would otherwise have)."""
    from temporalio.client import WorkflowQueryFailedError
    from temporalio.service import RPCError

    if not show:
        await asyncio.wait({result_task})
        return
    tty = sys.stderr.isatty()
    last_line, last_events = "", 0
    while True:
        finished = result_task.done()  # one more draw after the end, so the bar shows the final state
        try:
            status = await handle.query("get_status", result_type=_status_type())
        except (RPCError, WorkflowQueryFailedError):
            status = None  # a transient miss (worker busy, server restarting): the next tick tries again
        if status is not None and show:
            line = _fmt_status_line(status)
            legs_seen = len(status.legs)
            try:
                if legs_seen != last_events:  # a new leg: keep the old line, start a new one
                    if tty and last_line:
                        sys.stderr.write("\n")
                    last_events = legs_seen
                    for leg in status.legs[-2:-1]:
                        if leg.outcome:
                            _note(
                                f"  leg {leg.leg}: steps {leg.start_step}->{leg.end_step} {leg.outcome} ({leg.reason})"
                            )
                if line != last_line:
                    sys.stderr.write(("\r" + line + "\x1b[K") if tty else line + "\n")
                    sys.stderr.flush()
                    last_line = line
            except OSError:  # the terminal is gone (hung up, its SIGHUP on the way): draw nothing more
                show = False
        if finished:
            break
        await asyncio.wait({result_task}, timeout=1.0)
    if show and tty:
        sys.stderr.write("\n")


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {int(v) if float(v).is_integer() else round(v, 4)}" for k, v in sorted(metrics.items()))


def _print_summary(status: Any, volume_root: Path, failed: bool) -> None:
    out = sys.stdout
    print(f"\n{status.phase.value}: {status.message}", file=out)
    for leg in status.legs:
        print(
            f"  leg {leg.leg}: steps {leg.start_step} -> {leg.end_step}  {leg.outcome or 'running'}  {leg.reason}",
            file=out,
        )
    print(f"  preemptions {status.preemptions}, failures {status.failures}", file=out)
    if status.metrics:
        print(f"  held-out metrics: {_fmt_metrics(status.metrics)}", file=out)
    if status.model_path:
        print(f"  model: {volume_root / status.model_path}", file=out)
    if failed and status.phase.value != "Failed":
        print("  the workflow failed; see the Temporal Web UI", file=out)


async def _cmd_status(args: argparse.Namespace) -> int:
    if args.sweep:
        from controller.sweep.cli import show_status

        embedded = (Path(args.volume) / "temporal.db").is_file() and not _reachable(args.address)
        return await show_status(args, _temporal, embedded, CliError)
    from temporalio.service import RPCError

    from controller.run_workflows import find_run_workflow

    volume_root = Path(args.volume).resolve() if (Path(args.volume) / "temporal.db").is_file() else None
    wf_id = workflow_id(args.namespace, args.name)
    from temporalio.worker import Worker

    from controller.worker import TASK_QUEUE, WORKFLOWS

    embedded = volume_root is not None and not _reachable(args.address)
    async with _temporal(args.address, volume_root, embedded=True) as (client, _):
        # Queries are answered by a worker replaying the history. On the embedded server nobody else
        # runs one: serve the query with a workflows-only worker (no activities: it starts no legs).
        query_worker = Worker(client, task_queue=TASK_QUEUE, workflows=WORKFLOWS) if embedded else None
        async with query_worker or contextlib.nullcontext():
            try:
                # Under its id, or the legacy id of a run an older controller started (when its input names it).
                found = await find_run_workflow(client, args.namespace, args.name, None)
                handle = found.handle(client) if found else client.get_workflow_handle(wf_id)
                status = await handle.query("get_status", result_type=_status_type())
            except RPCError as exc:
                raise CliError(f"no TrainingRun {args.namespace}/{args.name} ({exc.message})") from None
    if args.json:
        print(json.dumps(status.to_json_dict(), indent=2))
    else:
        print(_fmt_status_line(status))
        print(f"{status.phase.value}: {status.message}")
        if status.metrics:
            print(f"metrics: {_fmt_metrics(status.metrics)}")
    return EXIT_OK


@contextlib.asynccontextmanager
async def _visibility_client(args: argparse.Namespace, temporal_namespace: str) -> AsyncIterator[Any]:
    """A client of `temporal_namespace` at --address; the embedded server (its db on --volume) when none answers.
    Visibility and histories need no worker."""
    from temporalio.client import Client

    volume_root = Path(args.volume).resolve() if (Path(args.volume) / "temporal.db").is_file() else None
    async with _temporal(args.address, volume_root, embedded=True) as (client, _):
        if temporal_namespace == client.namespace:
            yield client
        else:
            yield Client(client.service_client, namespace=temporal_namespace, data_converter=client.data_converter)


async def _cmd_list(args: argparse.Namespace) -> int:
    """Runs from visibility (search attributes and memo): one paged list call, no query to any workflow."""
    from datetime import UTC, datetime

    from temporalio.service import RPCError

    from controller.visibility import format_table, list_runs

    async with _visibility_client(args, args.namespace) as client:
        try:
            runs = await list_runs(client, phase=args.phase, run_namespace=args.run_namespace)
        except RPCError as exc:
            raise CliError(f"cannot list runs in Temporal namespace {args.namespace}: {exc.message}") from None
    now = datetime.now(UTC)
    if args.json:
        print(json.dumps([run.to_json(now) for run in runs], indent=2))
    else:
        print(format_table(runs, now))
    return EXIT_OK


async def _cmd_history(args: argparse.Namespace) -> int:
    """A run's story across continue-as-new, from its history alone, and a replay on the installed code."""
    from temporalio.service import RPCError

    from controller.history import UnknownRun, fetch_histories, format_story, replay, tell
    from controller.run_workflows import find_run_workflow

    async with _visibility_client(args, args.temporal_namespace) as client:
        try:
            found = await find_run_workflow(client, args.namespace, args.name, None)  # current or legacy id
            wf_id = found.workflow_id if found else workflow_id(args.namespace, args.name)
            histories = await fetch_histories(client, wf_id)
        except UnknownRun as exc:
            raise CliError(f"no TrainingRun {args.namespace}/{args.name}: {exc}") from None
        except RPCError as exc:
            raise CliError(f"cannot read the history of {args.namespace}/{args.name}: {exc.message}") from None
    story, report = tell(histories), await replay(histories)
    if args.json:
        document = {
            "workflowId": wf_id,
            "runIds": [entry.run_id for entry in story if entry.kind == "started"],
            "story": [entry.model_dump(mode="json", by_alias=True) for entry in story],
            "replay": {**report.model_dump(mode="json", by_alias=True), "ok": report.ok},
        }
        print(json.dumps(document, indent=2))
    else:
        print(format_story(wf_id, story, report))
    return EXIT_OK if report.ok else EXIT_ERROR


async def _cmd_signal(args: argparse.Namespace) -> int:
    from temporalio.service import RPCError

    from controller.run_workflows import find_run_workflow
    from controller.workflows import PauseRequest, ResumeRequest

    wf_id = workflow_id(args.namespace, args.name)
    request = PauseRequest(reason="relay pause") if args.command == "pause" else ResumeRequest(reason="relay resume")
    async with _temporal(args.address, None, embedded=False) as (client, _):
        try:
            found = await find_run_workflow(client, args.namespace, args.name, None)  # current or legacy id
            if found is not None:
                wf_id = found.workflow_id
            await client.get_workflow_handle(wf_id).signal(args.command, request)
        except RPCError as exc:
            raise CliError(f"no running TrainingRun {args.namespace}/{args.name} ({exc.message})") from None
    print(f"{args.command} sent to {wf_id}")
    return EXIT_OK


async def _cmd_predict(args: argparse.Namespace) -> int:
    """BertInferenceWorkflow: on a private local worker (default), or on a running worker's --task-queue."""
    from temporalio.client import WorkflowFailureError

    from controller.activities import PredictRequest, PredictResult

    if args.timeout <= 0:
        raise CliError("--timeout: must be a positive number of seconds", EXIT_BAD_INPUT)
    request = PredictRequest(
        namespace=args.namespace, name=args.name, texts=args.text, model_path=args.model, timeout_s=args.timeout
    )
    wf_id = f"inference-{args.namespace}-{args.name}-{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        if args.task_queue:  # the controller's (or a `relay worker`'s) worker runs it: no server, no worker here
            client = await stack.enter_async_context(_remote_temporal(args))
            task_queue = args.task_queue
        else:
            from controller.backends.local import LocalBackend
            from controller.worker import build_worker

            volume_root = _volume(args.volume, create=False)
            client, _ = await stack.enter_async_context(_temporal(args.address, volume_root, embedded=True))
            task_queue = f"relay-predict-{uuid.uuid4().hex[:8]}"
            await stack.enter_async_context(
                build_worker(client, LocalBackend(volume_root), volume_root, task_queue=task_queue)
            )
        try:
            result = await client.execute_workflow(
                "BertInferenceWorkflow", request, id=wf_id, task_queue=task_queue, result_type=PredictResult
            )
        except WorkflowFailureError as exc:
            cause: BaseException | None = exc.cause
            while getattr(cause, "cause", None) is not None:
                cause = getattr(cause, "cause", None)
            raise CliError(f"predict: {getattr(cause, 'message', cause)}") from None
    if args.json:
        print(json.dumps(result.model_dump(), indent=2))
    else:
        for item in result.predictions:
            scores = ", ".join(f"{s:.3f}" for s in item.scores)
            print(f"{item.label}\t[{scores}]\t{item.text}")
    return EXIT_OK


@contextlib.asynccontextmanager
async def _remote_temporal(args: argparse.Namespace) -> AsyncIterator[Any]:
    """A client of a Temporal server someone else runs (the controller's); never starts one."""
    from temporalio.service import RPCError

    from controller.kubernetes.temporal_client import connect, tls_config  # temporalio only, no Kubernetes client

    address, namespace = args.address, args.temporal_namespace
    try:
        tls = tls_config(args.temporal_tls_ca, args.temporal_tls_cert, args.temporal_tls_key)
    except OSError as exc:
        raise CliError(f"{exc.filename}: unreadable ({exc.strerror})", EXIT_BAD_INPUT) from None
    if not _reachable(address):
        raise CliError(f"cannot reach Temporal at {address} (the controller's; port-forward its frontend first)")
    try:
        client = await connect(address, namespace, tls)
    except (RPCError, RuntimeError, OSError) as exc:
        raise CliError(f"cannot connect to Temporal at {address} (namespace {namespace}): {exc}") from None
    yield client


async def _cmd_worker(args: argparse.Namespace) -> int:
    from controller.backends.local import LocalBackend
    from controller.worker import build_worker

    volume_root = _volume(args.volume, create=True)
    async with _temporal(args.address, None, embedded=False) as (client, _):
        worker = build_worker(client, LocalBackend(volume_root), volume_root, task_queue=args.task_queue)
        _note(f"worker on task queue {args.task_queue} at {args.address}, volume {volume_root}; Ctrl-C stops")
        await worker.run()
    return EXIT_OK


def _cmd_drill(args: argparse.Namespace) -> int:
    from controller.drill import run_drill  # imported only for `relay drill`

    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else None
    cluster = None
    if args.backend == "kubernetes":
        from controller.drill.kubernetes import ClusterTarget

        cluster = ClusterTarget(
            Path(args.kubeconfig) if args.kubeconfig else None,
            args.context,
            args.drill_namespace,
            Path(args.run_volume).resolve() if args.run_volume else None,
        )
    return run_drill(args.seed, args.faults, args.volume, kinds, backend=args.backend, cluster=cluster)[0]


def _cmd_plot(args: argparse.Namespace) -> Any:
    if args.sweep:
        from controller.sweep.cli import plot

        embedded = (Path(args.volume) / "temporal.db").is_file() and not _reachable(args.address)
        return plot(args, _temporal, embedded, CliError)  # a coroutine: run_command runs it
    from controller.plot import PlotError, plot_run  # matplotlib only for `relay plot`

    run_dir = Path(args.volume).expanduser() / "runs" / args.namespace / args.name
    try:
        plot_run(run_dir, Path(args.output))
    except PlotError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    _note(f"wrote {args.output}")
    return EXIT_OK


def _cmd_logs(args: argparse.Namespace) -> int:
    """A leg's trainer output from the volume: legs/<n>.log (and the older legs/<n>.log.1 first), kept after the
    run ended and its pods were deleted. Read without following a symlink: a planted link is refused."""
    from trainer.volume import RunLayout, SymlinkRefused

    for field, value in (("--namespace", args.namespace), ("NAME", args.name)):
        if not value or "/" in value or value in (".", ".."):
            raise CliError(f"{field} {value!r}: must be one name (no '/', not '.' or '..')", EXIT_BAD_INPUT)
    layout = RunLayout.for_run(Path(args.volume).expanduser().resolve(), args.namespace, args.name)
    if not layout.run_dir.is_dir():
        raise CliError(f"no run {args.namespace}/{args.name} on volume {args.volume} ({layout.run_dir})")
    legs = layout.leg_log_legs()
    leg = args.leg if args.leg is not None else (legs[-1] if legs else None)
    if leg is None or leg not in legs:
        which = f"leg {leg}" if leg is not None else "any leg"
        raise CliError(
            f"no log of {which} of {args.namespace}/{args.name} in {layout.legs_dir} (legs with one: {legs})"
        )
    try:
        _print_leg_log(layout, leg, args.follow)
    except SymlinkRefused as exc:
        raise CliError(f"{exc.filename}: {exc.strerror}; refused", EXIT_BAD_INPUT) from None
    except OSError as exc:
        raise CliError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
    return EXIT_OK


def _print_leg_log(layout: RunLayout, leg: int, follow: bool) -> None:
    """Copy the leg's log to stdout; with `follow`, keep copying what is appended until the leg has ended (its
    legs/<n>.json has an outcome, or a newer leg's log appeared) or Ctrl-C."""
    from trainer.volume import read_leg_record
    from trainer.volume.durable import open_file

    out = sys.stdout.buffer
    path = layout.leg_log_path(leg)
    with contextlib.suppress(FileNotFoundError):
        _copy(open_file(layout.leg_log_rotated_path(leg)), out, close=True)
    fd = open_file(path)
    try:
        _copy(fd, out)
        while follow:
            record = read_leg_record(layout, leg)
            ended = (record is not None and record.outcome is not None) or max(layout.leg_log_legs(), default=leg) > leg
            time.sleep(0 if ended else 0.5)
            _copy(fd, out)
            if os.fstat(fd).st_ino != os.stat(path, follow_symlinks=False).st_ino:  # rotated: on to the new file
                os.close(fd)
                fd = open_file(path)
                _copy(fd, out)
            if ended:
                return
    finally:
        os.close(fd)


def _copy(fd: int, out: Any, close: bool = False) -> None:
    try:
        while chunk := os.read(fd, 1 << 16):
            out.write(chunk)
        out.flush()
    finally:
        if close:
            os.close(fd)


def _cmd_controller(args: argparse.Namespace) -> int:
    try:
        from controller.kubernetes.main import main as operator_main  # kubernetes/kopf only when asked for
    except ImportError as exc:
        raise CliError(f"the Kubernetes operator cannot start: {exc} (install the [kubernetes] extra)") from None

    return int(operator_main(list(args.operator_args)))


# ---------------------------------------------------------------- parser and entry point


def build_parser() -> argparse.ArgumentParser:
    from controller.worker import INFERENCE_TASK_QUEUE, TASK_QUEUE  # light: temporalio only

    parser = argparse.ArgumentParser(prog="relay", description="Durable, preemption-tolerant BERT fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, volume: bool = True) -> None:
        p.add_argument("--address", default=DEFAULT_ADDRESS, help="Temporal frontend host:port")
        if volume:
            p.add_argument("--volume", default=DEFAULT_VOLUME, help="local folder used as the shared volume")

    p = sub.add_parser("run", help="run a TrainingRun file locally (embedded Temporal, legs as processes)")
    p.add_argument("file")
    common(p)
    p.add_argument(
        "--preempt-at-step",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="send a real SIGTERM to the leg when it reaches step N (repeatable; each used once)",
    )
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--task-queue", default=TASK_QUEUE)
    add_log_level_flag(p, "warning")  # the run prints its own progress; library INFO lines only when asked for
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", help="show a run's status (get_status query)")
    p.add_argument("name")
    p.add_argument("--namespace", default="default")
    p.add_argument("--json", action="store_true")
    p.add_argument("--sweep", action="store_true", help="NAME is a TrainingSweep: its trials table and best trial")
    common(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("sweep", help="run a TrainingSweep file locally (trials as local runs, ASHA early stopping)")
    p.add_argument("file")
    common(p)
    p.add_argument("--no-progress", action="store_true", help="no line per change of the trials")
    p.add_argument("--task-queue", default=TASK_QUEUE)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("list", help="list runs from Temporal's visibility (search attributes and memo)")
    p.add_argument("--namespace", default="default", help="Temporal namespace")
    p.add_argument("--phase", default=None, help="only runs in this phase (Running, Failed, Succeeded, ...)")
    p.add_argument("--run-namespace", default=None, help="only TrainingRuns of this Kubernetes namespace")
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("history", help="a run's story from its Temporal history, replayed on this code")
    p.add_argument("name")
    p.add_argument("--namespace", default="default", help="the TrainingRun's namespace")
    p.add_argument("--temporal-namespace", default="default", help="Temporal namespace")
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(func=_cmd_history)

    for verb, text in (("pause", "checkpoint and stop the current leg; no new leg"), ("resume", "resume a paused run")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("name")
        p.add_argument("--namespace", default="default")
        common(p, volume=False)
        p.set_defaults(func=_cmd_signal)

    p = sub.add_parser("predict", help="predict labels for texts with a finished run's model")
    p.add_argument("name")
    p.add_argument("--text", action="append", required=True, help="a text to classify (repeatable)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--model", default=None, help="model folder relative to the volume (default: the run's final/)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the predictions, pod start included")
    p.add_argument(
        "--task-queue",
        default=None,
        help=f"ask the worker already serving this queue (the controller's: {INFERENCE_TASK_QUEUE}) at --address; "
        "no embedded server or worker, --volume unused",
    )
    p.add_argument("--temporal-namespace", default="default", help="Temporal namespace, with --task-queue")
    p.add_argument("--temporal-tls-cert", type=Path, help="client certificate (mTLS), with --task-queue")
    p.add_argument("--temporal-tls-key", type=Path, help="client key (mTLS), with --task-queue")
    p.add_argument("--temporal-tls-ca", type=Path, help="CA bundle of the Temporal frontend, with --task-queue")
    common(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("validate", help="check a TrainingRun or TrainingSweep file; names every bad field")
    p.add_argument("file")
    p.add_argument("--policy", help="also check the cluster's allow-lists (the JSON `relay controller --policy` takes)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser(
        "worker",
        help="a standalone worker (local backend) for an external Temporal server; "
        "on Kubernetes: relay controller --no-handlers --task-queue Q",
    )
    common(p)
    p.add_argument(
        "--task-queue", default=TASK_QUEUE, help=f"training ({TASK_QUEUE}) or inference ({INFERENCE_TASK_QUEUE})"
    )
    add_log_level_flag(p, "info")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("controller", help="run the Kubernetes operator (arguments go to it)")
    p.add_argument("operator_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_controller)

    p = sub.add_parser(
        "drill", help="a tiny run under a seeded sequence of real faults; exit 0 only if nothing is lost"
    )
    p.add_argument(
        "--backend",
        choices=("local", "kubernetes"),
        default="local",
        help="local processes (default), or Jobs on the cluster the kubeconfig names (API-level faults: Eviction, "
        "force delete, controller and server restarts)",
    )
    p.add_argument("--kubeconfig", default=None, help="kubernetes: default $KUBECONFIG, else ~/.kube/config")
    p.add_argument("--context", default=None, help="kubernetes: a context of the kubeconfig (default: its current one)")
    p.add_argument(
        "--namespace",
        dest="drill_namespace",
        default="relay-drill",
        help="kubernetes: the namespace of the drill's TrainingRun; its claim relay-shared and the CRD must exist",
    )
    p.add_argument(
        "--run-volume",
        default=None,
        help="kubernetes: where this machine sees that namespace's claim relay-shared (the controller and checks "
        "read the run folder there)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", type=int, default=5)
    p.add_argument("--volume", default=None, help="an empty folder for the drill (default: a new temporary one)")
    p.add_argument(
        "--kinds",
        default=None,
        help="comma-separated fault kinds to draw from (default: all but the opt-in stalled-leg and node-lost; "
        "node-lost needs a node harness on the kubernetes backend, the local backend has no node: use stalled-leg)",
    )
    p.set_defaults(func=_cmd_drill)

    p = sub.add_parser(
        "logs", help="a leg's trainer output, kept on the volume after the run (runs/<ns>/<name>/legs/<n>.log)"
    )
    p.add_argument("name")
    p.add_argument("--namespace", default="default")
    p.add_argument("--volume", default=DEFAULT_VOLUME, help="the volume folder holding runs/<namespace>/<name>")
    p.add_argument("--leg", type=int, default=None, help="which leg (default: the newest with a log)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the leg ends")
    p.set_defaults(func=_cmd_logs)

    p = sub.add_parser("plot", help="draw a run's story (loss, legs, preemptions, checkpoints) from its run folder")
    p.add_argument("name")
    p.add_argument("--namespace", default="default")
    p.add_argument("--volume", default=DEFAULT_VOLUME, help="the volume folder holding runs/<namespace>/<name>")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--sweep", action="store_true", help="NAME is a TrainingSweep: every trial's eval metric by step")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="Temporal frontend host:port (with --sweep)")
    p.set_defaults(func=_cmd_plot)
    return parser


class _OneLineFormatter(logging.Formatter):
    """Log records as one line each: no tracebacks on a user's terminal (set RELAY_DEBUG=1 for them), and a
    message of several lines (a Kubernetes ApiException: reason, headers, body) joined with " | "."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's API
        return "" if not os.environ.get("RELAY_DEBUG") else super().formatException(ei)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).rstrip()
        if os.environ.get("RELAY_DEBUG"):
            return text
        return " | ".join(line.strip() for line in text.splitlines() if line.strip())


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_LEVEL_ENV = "RELAY_LOG_LEVEL"


def add_log_level_flag(parser: argparse.ArgumentParser, default: str) -> None:
    """`--log-level {debug,info,warning,error}`; unset, $RELAY_LOG_LEVEL, else `default` (see log_level)."""
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=None,
        help=f"how much to log (default: ${LOG_LEVEL_ENV}, else {default})",
    )
    parser.set_defaults(log_level_default=default)


def log_level(flag: str | None, default: str) -> str:
    """The level a process logs at: its --log-level, else $RELAY_LOG_LEVEL, else its own default.

    Raises ValueError naming RELAY_LOG_LEVEL when the variable holds no level (a flag is checked by argparse).
    """
    if flag:
        return flag
    text = os.environ.get(LOG_LEVEL_ENV, "").strip().lower()
    if not text:
        return default
    if text not in LOG_LEVELS:
        raise ValueError(f"{LOG_LEVEL_ENV}={text!r} is not a log level (one of {', '.join(LOG_LEVELS)})")
    return text


def setup_logging(level: str = "warning", *, timestamps: bool = False) -> None:
    """Log to stderr, one line per record, at `level`. A long-running process (the controller, a worker) logs at
    INFO with timestamps: one line per run event (leg launched, ended, preempted, resumed; the run finished)."""
    handler = logging.StreamHandler(sys.stderr)
    layout = "%(asctime)s %(levelname)s %(name)s: %(message)s" if timestamps else "relay: %(levelname)s %(message)s"
    handler.setFormatter(_OneLineFormatter(layout))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    debug = level == "debug"
    # An activity that fails by design (a missing model, bad data) is reported by the workflow's own result.
    logging.getLogger("temporalio.worker._activity").setLevel(logging.NOTSET if debug else logging.ERROR)
    logging.getLogger("temporalio.activity").setLevel(logging.NOTSET if debug else logging.ERROR)
    # kopf says "Handler ... succeeded" for every change of every object: its own lines are debugging detail.
    logging.getLogger("kopf").setLevel(logging.NOTSET if debug else max(logging.WARNING, logging.root.level))


def run_command(argv: list[str] | None = None) -> int:
    """Parse and run one command; returns the exit code (expected errors printed as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["controller"]:  # everything after it, --help included, belongs to the operator
        argv = ["controller", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    if args.command == "controller" and args.operator_args[:1] == ["--"]:
        args.operator_args = args.operator_args[1:]
    try:
        level = log_level(getattr(args, "log_level", None), getattr(args, "log_level_default", "warning"))
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # The operator sets up its own logging from its own --log-level (`relay controller --log-level debug`).
    setup_logging(level, timestamps=args.command == "worker")
    received: list[int] = []
    try:
        result = args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(_cancelled_by_signals(result, received))
        if received and result == EXIT_INTERRUPTED:
            return 128 + received[0]  # the shell's convention: 143 after SIGTERM, 129 after SIGHUP
        return int(result)
    except asyncio.CancelledError:
        if not received:
            raise
        with contextlib.suppress(OSError):
            print(f"relay: stopped by {signal.Signals(received[0]).name}", file=sys.stderr)
        return 128 + received[0]
    except InvalidTrainingRun as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except CliError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("relay: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


async def _cancelled_by_signals(command: Coroutine[Any, Any, int], received: list[int]) -> int:
    """Run a command's coroutine; each of TERMINATING_SIGNALS cancels it as Ctrl-C does, and is noted in `received`.

    The cancellation unwinds the command: `relay run` stops its running leg (the leg checkpoints) and every command
    leaves its `async with` blocks, the embedded dev server's and the worker's included.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def cancel(signum: int) -> None:
        received.append(signum)
        task.cancel()

    for signum in TERMINATING_SIGNALS:
        loop.add_signal_handler(signum, cancel, signum)
    try:
        return await command
    finally:
        for signum in TERMINATING_SIGNALS:
            loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point. Ends the process deliberately: the Temporal client can crash at interpreter exit (sdk #300)."""
    started = time.monotonic()
    code = run_command(argv)
    with contextlib.suppress(OSError):  # a terminal that hung up takes what was left to print with it
        sys.stdout.flush()
        sys.stderr.flush()
    if os.environ.get("RELAY_CLI_TIMING"):
        print(f"relay: {time.monotonic() - started:.1f}s", file=sys.stderr)
    os._exit(code)


if __name__ == "__main__":
    main()
