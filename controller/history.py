"""A run's story from its Temporal history: every execution across continue-as-new, told in time order, and replayed.

`fetch_histories` walks back from the newest execution of a workflow id through each start event's
`continuedExecutionRunId`, so a week-long run of many executions reads as one. `tell` turns the events into
`StoryEntry`s: the Events the workflow published (legs started or resumed from a checkpoint, preemptions,
failures with their backoff, quarantines, pauses), the leg records (start, end, verdict), checkpoints as
the leg watches saw them, signals, backoff timers, fallback-profile launches and how each execution ended.
It reads only what the history holds (activity inputs and results, decoded with Relay's data converter),
so it works after the run has finished and without a worker. `replay` runs the histories through the
installed workflow code (the production sandbox) and names each execution that replays non-deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC
from typing import Any

from temporalio.api.common.v1 import Payloads
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Replayer

from controller.messages import (
    AwaitLegResult,
    LaunchLegRequest,
    PauseRequest,
    PublishStatusRequest,
    RecordLegRequest,
)
from controller.status import rfc3339
from controller.worker import DATA_CONVERTER, WORKFLOW_RUNNER, WORKFLOWS
from trainer.config import CamelModel


class UnknownRun(LookupError):
    """No execution under the workflow id looked for; the message names it."""


class StoryEntry(CamelModel):
    """One line of a run's story."""

    time: str  # RFC 3339, the history event's time
    run_id: str  # the execution (continue-as-new starts a new one)
    kind: str  # started, leg, checkpoint, signal, backoff, fallback, ended, or a published Event's reason
    text: str


class ReplayReport(CamelModel):
    """What replaying the histories on the installed code found: run id -> failure, empty when deterministic."""

    executions: int
    failures: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.failures


async def fetch_histories(client: Client, wf_id: str) -> list[WorkflowHistory]:
    """Every execution of the newest chain under `wf_id`, oldest first; UnknownRun when there is none."""
    try:
        newest = await client.get_workflow_handle(wf_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise UnknownRun(f"no workflow {wf_id} in Temporal namespace {client.namespace}") from None
        raise
    histories: list[WorkflowHistory] = []
    run_id: str | None = newest.run_id
    while run_id and len(histories) < 10_000:
        history = await client.get_workflow_handle(wf_id, run_id=run_id).fetch_history()
        histories.append(history)
        first = history.events[0] if history.events else None
        started = first.workflow_execution_started_event_attributes if first is not None else None
        run_id = started.continued_execution_run_id if started is not None else None
    return histories[::-1]


def _decode(payloads: Payloads, type_: type) -> Any:
    """The first payload as `type_`, or None when it is absent or not one (a history from other code)."""
    if not payloads.payloads:
        return None
    try:
        return DATA_CONVERTER.payload_converter.from_payloads(payloads.payloads, [type_])[0]
    except Exception:  # the converter raises what it likes on a payload of another shape
        return None


def _time(event: HistoryEvent) -> str:
    return rfc3339(event.event_time.ToDatetime(tzinfo=UTC))


def _run_id(history: WorkflowHistory) -> str:
    first = history.events[0] if history.events else None
    return first.workflow_execution_started_event_attributes.original_execution_run_id if first else ""


def _leg_line(request: RecordLegRequest) -> str:
    record = request.record
    end = record.end_step if record.end_step is not None else "?"
    span = f"{record.started_at or '?'} -> {record.ended_at or '?'}"
    return (
        f"leg {record.leg}: steps {record.start_step} -> {end}, {record.outcome or 'running'} ({record.reason}); {span}"
    )


def _tell_one(history: WorkflowHistory, run_id: str, first: bool, checkpoints: set[int]) -> list[StoryEntry]:
    story: list[StoryEntry] = []
    scheduled: dict[int, HistoryEvent] = {}

    def add(event: HistoryEvent, kind: str, text: str) -> None:
        story.append(StoryEntry(time=_time(event), run_id=run_id, kind=kind, text=text))

    for event in history.events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            attrs = event.workflow_execution_started_event_attributes
            if first or not attrs.continued_execution_run_id:
                add(event, "started", f"workflow {history.workflow_id} started (run {run_id})")
            else:
                add(event, "started", f"continued as new (run {run_id}, from {attrs.continued_execution_run_id})")
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[event.event_id] = event
            attrs_s = event.activity_task_scheduled_event_attributes
            name = attrs_s.activity_type.name
            if name == "publish_status":
                published = _decode(attrs_s.input, PublishStatusRequest)
                for run_event in published.events if published is not None else []:
                    add(event, run_event.reason, run_event.message)
            elif name == "record_leg":
                recorded = _decode(attrs_s.input, RecordLegRequest)
                if recorded is not None:
                    add(event, "leg", _leg_line(recorded))
            elif name == "launch_leg":
                launch = _decode(attrs_s.input, LaunchLegRequest)
                if launch is not None and launch.leg.use_fallback_profile:
                    add(event, "fallback", f"leg {launch.leg.leg} launched on the fallback scheduling profile")
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attrs_c = event.activity_task_completed_event_attributes
            origin = scheduled.get(attrs_c.scheduled_event_id)
            name = origin.activity_task_scheduled_event_attributes.activity_type.name if origin else ""
            if name == "await_leg":  # a leg's start and resume point are in its published Events
                watched = _decode(attrs_c.result, AwaitLegResult)
                checkpoint = watched.progress.latest_checkpoint if watched is not None else None
                if checkpoint is not None and checkpoint.step not in checkpoints:
                    checkpoints.add(checkpoint.step)
                    add(event, "checkpoint", f"checkpoint step {checkpoint.step} verified ({checkpoint.path})")
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            signal = event.workflow_execution_signaled_event_attributes
            request = _decode(signal.input, PauseRequest)  # ResumeRequest has the same one field
            reason = f" ({request.reason})" if request is not None else ""
            add(event, "signal", f"signal {signal.signal_name}{reason}")
        elif kind == EventType.EVENT_TYPE_TIMER_STARTED:
            timeout = event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
            add(event, "backoff", f"waiting {timeout.total_seconds():g}s before the next leg")
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
            add(event, "continued", "continued as new (history stays bounded)")
        elif kind in _ENDINGS:
            add(event, "ended", f"workflow {_ENDINGS[kind]}")
    return story


_ENDINGS = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED: "completed",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED: "failed",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED: "cancelled",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED: "terminated",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT: "timed out",
}


def tell(histories: Sequence[WorkflowHistory]) -> list[StoryEntry]:
    """The story of a run's executions (oldest first), in time order."""
    story: list[StoryEntry] = []
    checkpoints: set[int] = set()
    for index, history in enumerate(histories):
        story += _tell_one(history, _run_id(history), index == 0, checkpoints)
    return story  # events are in time order within an execution, executions follow each other


async def replay(histories: Sequence[WorkflowHistory]) -> ReplayReport:
    """Replay each execution on the installed workflow code, in the production worker's sandbox."""
    replayer = Replayer(workflows=WORKFLOWS, data_converter=DATA_CONVERTER, workflow_runner=WORKFLOW_RUNNER)
    failures: dict[str, str] = {}
    for history in histories:
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        if result.replay_failure is not None:
            failures[_run_id(history)] = f"{type(result.replay_failure).__name__}: {result.replay_failure}"
    return ReplayReport(executions=len(histories), failures=failures)


def format_story(wf_id: str, story: Sequence[StoryEntry], report: ReplayReport) -> str:
    """`relay history`'s text: one line per entry, then the replay verdict."""
    lines = [f"{wf_id}: {report.executions} execution(s), {len(story)} entries"]
    lines += [f"{entry.time}  {entry.kind:<22} {entry.text}" for entry in story]
    if report.ok:
        lines.append(f"replay: deterministic on the installed code ({report.executions} execution(s))")
    else:
        lines += [f"replay: NON-DETERMINISTIC in run {run}: {failure}" for run, failure in report.failures.items()]
    return "\n".join(lines)
