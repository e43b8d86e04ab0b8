"""What Temporal's visibility shows of a run: the custom search attributes, the memo, and `relay list`'s query.

Six typed search attributes (`RelayNamespace`, `RelayRun`, `RelayPhase`, `RelayModel` keywords; `RelayStep`,
`RelayPreemptions` ints) make runs findable in the Web UI and with `temporal workflow list --query`; the memo
`relay` holds a `RunSummary` (phase, step/total, legs, preemptions, newest checkpoint, times), which
`relay list` reads for 500 runs in one paged ListWorkflowExecutions instead of one query per workflow.

A server refuses a workflow task that upserts an attribute it does not know (the run would stall), so the
starter checks the server's attributes (`check_search_attributes`) and starts the workflow with the ones
registered with the right type; the workflow upserts only the keys it was started with (`upserts_due`),
which its history records, so replay is deterministic. The memo needs no registration: it is always kept.
Pure models and functions, plus the client-side check and listing; no Kubernetes, no volume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import Field
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    SearchAttributeUpdate,
    TypedSearchAttributes,
)
from temporalio.service import RPCError

from controller.status import Phase, RunStatus
from trainer.config import CamelModel

log = logging.getLogger(__name__)

RELAY_NAMESPACE = SearchAttributeKey.for_keyword("RelayNamespace")
RELAY_RUN = SearchAttributeKey.for_keyword("RelayRun")
RELAY_PHASE = SearchAttributeKey.for_keyword("RelayPhase")
RELAY_MODEL = SearchAttributeKey.for_keyword("RelayModel")
RELAY_STEP = SearchAttributeKey.for_int("RelayStep")
RELAY_PREEMPTIONS = SearchAttributeKey.for_int("RelayPreemptions")
SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[Any], ...] = (
    RELAY_NAMESPACE,
    RELAY_RUN,
    RELAY_PHASE,
    RELAY_MODEL,
    RELAY_STEP,
    RELAY_PREEMPTIONS,
)
MEMO_KEY = "relay"
TRAINING_WORKFLOW_TYPE = "CheckpointedBertTrainingWorkflow"
# The workflow.patched id that guards the upsert commands: histories recorded before them replay unchanged.
VISIBILITY_PATCH = "relay-search-attributes"
# The step moves every few seconds; each upsert is two history events (attributes, memo). Phase, leg and
# preemption changes are upserted at once; step and checkpoint alone at most this often (60 events an hour).
STEP_UPSERT_INTERVAL = timedelta(minutes=1)

_CLI_TYPE: dict[int, str] = {  # IndexedValueType -> the `temporal ... --search-attribute KEY=TYPE` spelling
    IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD: "Keyword",
    IndexedValueType.INDEXED_VALUE_TYPE_INT: "Int",
}


def cli_type(key: SearchAttributeKey[Any]) -> str:
    """`Keyword` or `Int`: the type name the temporal CLI takes for `key`."""
    return _CLI_TYPE[int(key.indexed_value_type)]


def dev_server_flags() -> list[str]:
    """`--search-attribute KEY=TYPE` for each Relay attribute: `temporal server start-dev` registers them."""
    flags: list[str] = []
    for key in SEARCH_ATTRIBUTES:
        flags += ["--search-attribute", f"{key.name}={cli_type(key)}"]
    return flags


def create_commands(namespace: str = "default") -> list[str]:
    """The one-time commands that register the attributes on an external Temporal (the README lists them)."""
    return [
        f"temporal operator search-attribute create --namespace {namespace} --name {key.name} --type {cli_type(key)}"
        for key in SEARCH_ATTRIBUTES
    ]


class RunSummary(CamelModel):
    """The memo `relay`: one run's row in `relay list`, readable without a worker."""

    namespace: str
    name: str
    model: str = ""
    phase: Phase = Phase.PENDING
    message: str = ""
    step: int = Field(0, ge=0)
    total_steps: int | None = None
    legs: int = Field(0, ge=0)
    preemptions: int = Field(0, ge=0)
    failures: int = Field(0, ge=0)
    checkpoint_step: int | None = None
    checkpoint_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None

    def coarse(self) -> tuple[object, ...]:
        """What is upserted at once when it changes (the rest waits for STEP_UPSERT_INTERVAL)."""
        return (self.phase, self.legs, self.preemptions, self.failures, self.total_steps, self.finished_at)


def summarize(namespace: str, name: str, model: str, status: RunStatus) -> RunSummary:
    checkpoint = status.latest_checkpoint
    return RunSummary(
        namespace=namespace,
        name=name,
        model=model,
        phase=status.phase,
        message=status.message[:200],
        step=status.step,
        total_steps=status.total_steps,
        legs=len(status.legs),
        preemptions=status.preemptions,
        failures=status.failures,
        checkpoint_step=checkpoint.step if checkpoint else None,
        checkpoint_at=checkpoint.created_at if checkpoint else None,
        started_at=status.started_at,
        finished_at=status.finished_at,
    )


def attribute_values(summary: RunSummary) -> dict[str, str | int]:
    """Each Relay search attribute's value for this summary, by name."""
    return {
        RELAY_NAMESPACE.name: summary.namespace,
        RELAY_RUN.name: summary.name,
        RELAY_PHASE.name: summary.phase.value,
        RELAY_MODEL.name: summary.model,
        RELAY_STEP.name: summary.step,
        RELAY_PREEMPTIONS.name: summary.preemptions,
    }


def upserts_due(
    previous: RunSummary | None,
    current: RunSummary,
    last_upsert: datetime | None,
    now: datetime,
    registered: Sequence[SearchAttributeKey[Any]],
) -> list[SearchAttributeUpdate[Any]] | None:
    """The attribute updates to send now (only `registered` keys), [] for the memo alone, None when nothing is due."""
    if previous == current:
        return None
    recent = last_upsert is not None and now - last_upsert < STEP_UPSERT_INTERVAL
    if previous is not None and previous.coarse() == current.coarse() and recent:
        return None
    values = attribute_values(current)
    old = attribute_values(previous) if previous is not None else {}
    return [key.value_set(values[key.name]) for key in registered if old.get(key.name) != values[key.name]]


def initial_attributes(
    namespace: str, name: str, model: str, registered: Sequence[SearchAttributeKey[Any]]
) -> TypedSearchAttributes:
    """The attributes a run starts with (Pending, step 0); the workflow upserts exactly these keys later."""
    values = attribute_values(RunSummary(namespace=namespace, name=name, model=model))
    return TypedSearchAttributes([SearchAttributePair(key, values[key.name]) for key in registered])


@dataclass(frozen=True)
class AttributeCheck:
    """Which Relay attributes the server has with the right type; `problems` names each one it has not."""

    registered: tuple[SearchAttributeKey[Any], ...]
    problems: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.problems

    def message(self, namespace: str) -> str:
        fix = "; ".join(create_commands(namespace))
        return (
            f"Temporal namespace {namespace}: search attributes {', '.join(self.problems)}; runs start without "
            f"them (the memo and `relay list` still work). Register them once: {fix}"
        )


async def check_search_attributes(client: Client) -> AttributeCheck:
    """Compare the server's custom search attributes with Relay's; a server that will not say counts as none."""
    try:
        response = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
    except RPCError as exc:
        return AttributeCheck((), (f"unknown (the server did not list them: {exc.message})",))
    return compare_attributes(dict(response.custom_attributes))


def compare_attributes(known: dict[str, int]) -> AttributeCheck:
    """Relay's attributes against the server's custom ones (name -> IndexedValueType)."""
    registered: list[SearchAttributeKey[Any]] = []
    problems: list[str] = []
    for key in SEARCH_ATTRIBUTES:
        found = known.get(key.name)
        if found is None:
            problems.append(f"{key.name} missing")
        elif found != int(key.indexed_value_type):
            actual = (
                IndexedValueType.Name(IndexedValueType.ValueType(found)).removeprefix("INDEXED_VALUE_TYPE_").title()
            )
            problems.append(f"{key.name} is {actual}, not {cli_type(key)}")
        else:
            registered.append(key)
    return AttributeCheck(tuple(registered), tuple(problems))


async def start_attributes(client: Client, namespace: str, name: str, model: str) -> TypedSearchAttributes:
    """The search attributes to start a run's workflow with; logs a warning naming what the server lacks."""
    check = await check_search_attributes(client)
    if not check.complete:
        log.warning("%s", check.message(client.namespace))
    return initial_attributes(namespace, name, model, check.registered)


# ---------------------------------------------------------------- relay list


@dataclass(frozen=True)
class ListedRun:
    """One run as visibility shows it: its memo, or, for runs started before the memo, what the server knows."""

    workflow_id: str
    status: str  # Temporal's execution status: Running, Completed, Failed, ...
    start_time: datetime
    summary: RunSummary | None

    def phase(self) -> str:
        return self.summary.phase.value if self.summary else self.status

    def age_s(self, now: datetime) -> float:
        started = self.summary.started_at if self.summary and self.summary.started_at else None
        moment = datetime.fromisoformat(started.replace("Z", "+00:00")) if started else self.start_time
        return max(0.0, (now - moment).total_seconds())

    def to_json(self, now: datetime) -> dict[str, object]:
        row: dict[str, object] = {
            "workflowId": self.workflow_id,
            "executionStatus": self.status,
            "phase": self.phase(),
            "ageSeconds": round(self.age_s(now)),
        }
        if self.summary is not None:
            row.update(self.summary.model_dump(mode="json", by_alias=True))
            row["phase"] = self.phase()
        return row


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def list_query(phase: str | None, run_namespace: str | None, indexed: bool) -> str:
    """The visibility query of `relay list`: the newest execution of each training workflow, filtered on the
    server when the attributes are registered (`indexed`), else the filters are applied to the memo."""
    clauses = [f"WorkflowType = {_quoted(TRAINING_WORKFLOW_TYPE)}", 'ExecutionStatus != "ContinuedAsNew"']
    if indexed and phase:
        clauses.append(f"{RELAY_PHASE.name} = {_quoted(phase)}")
    if indexed and run_namespace:
        clauses.append(f"{RELAY_NAMESPACE.name} = {_quoted(run_namespace)}")
    return " AND ".join(clauses)


async def list_runs(client: Client, phase: str | None = None, run_namespace: str | None = None) -> list[ListedRun]:
    """Every training run the namespace's visibility holds, newest first, filtered by phase and run namespace."""
    check = await check_search_attributes(client)
    indexed = {RELAY_PHASE, RELAY_NAMESPACE} <= set(check.registered)
    runs: list[ListedRun] = []
    async for execution in client.list_workflows(list_query(phase, run_namespace, indexed), page_size=1000):
        summary: RunSummary | None = None
        if MEMO_KEY in execution.raw_info.memo.fields:
            try:
                summary = await execution.memo_value(MEMO_KEY, type_hint=RunSummary)
            except Exception:  # a memo someone else wrote under our key: shown as a run without a summary
                summary = None
        status = execution.status.name.title() if execution.status else "Unknown"
        run = ListedRun(execution.id, status, execution.start_time, summary)
        if phase and run.phase() != phase:
            continue
        if run_namespace and (summary is None or summary.namespace != run_namespace):
            continue
        runs.append(run)
    return runs


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def format_table(runs: Sequence[ListedRun], now: datetime | None = None) -> str:
    """`relay list`'s table: one line per run, columns aligned."""
    now = now or datetime.now(UTC)
    header = ("NAMESPACE", "NAME", "PHASE", "STEP", "LEGS", "PREEMPTIONS", "CHECKPOINT", "AGE")
    rows = [header]
    for run in runs:
        s = run.summary
        if s is None:
            rows.append(("?", run.workflow_id, run.phase(), "?", "?", "?", "?", _age(run.age_s(now))))
            continue
        step = f"{s.step}/{s.total_steps if s.total_steps is not None else '?'}"
        checkpoint = f"step {s.checkpoint_step}" if s.checkpoint_step is not None else "-"
        row = (s.namespace, s.name, run.phase(), step, str(s.legs), str(s.preemptions), checkpoint)
        rows.append((*row, _age(run.age_s(now))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
