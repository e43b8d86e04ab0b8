"""RunStatus as kubectl and `temporal workflow query` see it, and the CLI's import discipline."""

from __future__ import annotations

import subprocess
import sys

from controller.status import LegStatus, Phase, RunStatus, rfc3339


def test_status_json_is_camel_case_and_trimmed_for_the_custom_resource():
    status = RunStatus(phase=Phase.RUNNING, step=5, total_steps=10, progress=0.5)
    status.legs = [LegStatus(leg=n, start_step=n, outcome="preempted") for n in range(30)]
    document = status.to_json_dict()
    assert document["phase"] == "Running" and document["totalSteps"] == 10 and document["legs"][0]["startStep"] == 0
    trimmed = status.for_custom_resource(max_legs=5)
    assert [leg.leg for leg in trimmed.legs] == [25, 26, 27, 28, 29]
    assert len(status.legs) == 30  # the workflow's own copy is untouched
    assert RunStatus.model_validate(document) == status  # round trip through the wire format


def test_condition_transition_time_changes_only_when_status_flips():
    status = RunStatus()
    status.set_condition("Ready", "False", "Pending", "accepted", now="2026-01-01T00:00:00Z")
    status.set_condition("Ready", "False", "Snapshotting", "still not", now="2026-01-01T00:05:00Z")
    ready = status.condition("Ready")
    assert ready is not None and ready.last_transition_time == "2026-01-01T00:00:00Z" and ready.reason == "Snapshotting"
    status.set_condition("Ready", "True", "Training", "leg 0 running", now="2026-01-01T00:10:00Z")
    assert status.condition("Ready").last_transition_time == "2026-01-01T00:10:00Z"  # type: ignore[union-attr]
    assert len(status.conditions) == 1


def test_rfc3339():
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert Phase.CANCELLED.finished and not Phase.PAUSED.finished


def test_cli_imports_neither_torch_nor_kubernetes():
    code = (
        "import sys, controller.cli as c; c.build_parser(); "
        "bad = [m for m in ('torch', 'kubernetes', 'kopf', 'transformers') if m in sys.modules]; "
        "sys.exit(str(bad) if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_relay_controller_hands_every_argument_to_the_operator(monkeypatch):
    import types

    from controller.cli import run_command

    seen: list[list[str]] = []
    operator = types.ModuleType("controller.kubernetes.main")
    operator.main = lambda argv: seen.append(argv) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "controller.kubernetes.main", operator)
    assert run_command(["controller", "--help", "--namespace", "ml"]) == 7
    assert seen == [["--help", "--namespace", "ml"]]
