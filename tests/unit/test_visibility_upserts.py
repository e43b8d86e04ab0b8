"""When the workflow upserts its search attributes and memo (controller.visibility.upserts_due), as a table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from controller.status import Phase
from controller.visibility import (
    RELAY_PHASE,
    RELAY_STEP,
    SEARCH_ATTRIBUTES,
    STEP_UPSERT_INTERVAL,
    RunSummary,
    dev_server_flags,
    upserts_due,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def summary(**changes: object) -> RunSummary:
    return RunSummary(namespace="ml", name="r", model="tiny", **changes)  # type: ignore[arg-type]


def names(updates: object) -> list[str] | None:
    return None if updates is None else [u.key.name for u in updates]  # type: ignore[attr-defined]


def test_the_first_summary_sets_every_registered_attribute():
    assert names(upserts_due(None, summary(), None, T0, SEARCH_ATTRIBUTES)) == [k.name for k in SEARCH_ATTRIBUTES]
    assert names(upserts_due(None, summary(), None, T0, [RELAY_PHASE])) == ["RelayPhase"]
    assert names(upserts_due(None, summary(), None, T0, [])) == []  # the memo alone


def test_a_phase_change_is_upserted_at_once_and_a_step_alone_waits_for_the_interval():
    running = summary(phase=Phase.RUNNING, step=10)
    soon, later = T0 + timedelta(seconds=5), T0 + STEP_UPSERT_INTERVAL
    assert upserts_due(running, running, T0, soon, SEARCH_ATTRIBUTES) is None
    assert names(upserts_due(summary(step=10), running, T0, soon, SEARCH_ATTRIBUTES)) == ["RelayPhase"]
    assert upserts_due(running, summary(phase=Phase.RUNNING, step=20), T0, soon, SEARCH_ATTRIBUTES) is None
    assert names(upserts_due(running, summary(phase=Phase.RUNNING, step=20), T0, later, SEARCH_ATTRIBUTES)) == [
        "RelayStep"
    ]
    assert names(upserts_due(running, summary(phase=Phase.RUNNING, step=20), T0, later, [RELAY_PHASE])) == []
    preempted = summary(phase=Phase.RUNNING, step=20, legs=2, preemptions=1)
    assert names(upserts_due(running, preempted, T0, soon, [RELAY_STEP])) == ["RelayStep"]


def test_the_dev_server_flags_name_each_attribute_with_its_type():
    assert dev_server_flags()[:2] == ["--search-attribute", "RelayNamespace=Keyword"]
    assert dev_server_flags()[-2:] == ["--search-attribute", "RelayPreemptions=Int"]
