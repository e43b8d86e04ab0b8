"""Log levels: the long-running processes (the Kubernetes controller, `relay worker`) log at INFO by default, one
line per run event; `relay run` stays at WARNING (it prints its own progress). `--log-level` and RELAY_LOG_LEVEL
change that, and a bad value is refused naming the flag or the variable."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from controller import cli
from controller.kubernetes import main as operator
from controller.observability import RunEventLog
from controller.status import LegStatus, RunEvent, RunStatus


class RecordingSink:
    def __init__(self) -> None:
        self.published: list[tuple[str, str, list[RunEvent]]] = []

    async def publish(self, namespace: str, name: str, status: RunStatus, events: list[RunEvent]) -> None:
        self.published.append((namespace, name, events))


def _level(args: Any) -> str:
    return cli.log_level(args.log_level, args.log_level_default)


def test_defaults_are_info_for_the_controller_and_worker_and_warning_for_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.LOG_LEVEL_ENV, raising=False)
    assert _level(operator.build_parser().parse_args([])) == "info"
    assert _level(cli.build_parser().parse_args(["worker"])) == "info"
    assert _level(cli.build_parser().parse_args(["run", "run.yaml"])) == "warning"


def test_the_flag_beats_the_variable_which_beats_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.LOG_LEVEL_ENV, "Debug")
    assert _level(operator.build_parser().parse_args([])) == "debug"
    assert _level(cli.build_parser().parse_args(["run", "run.yaml"])) == "debug"
    assert _level(operator.build_parser().parse_args(["--log-level", "ERROR"])) == "error"
    assert _level(cli.build_parser().parse_args(["worker", "--log-level", "warning"])) == "warning"


@pytest.mark.parametrize("argv", [["worker", "--log-level", "loud"], ["run", "x.yaml", "--log-level", "verbose"]])
def test_a_bad_flag_value_is_refused_naming_the_flag(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert f"argument --log-level: invalid choice: '{argv[-1]}'" in capsys.readouterr().err


def test_a_bad_flag_value_is_refused_by_the_controller(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        operator.main(["--log-level", "chatty"])
    assert exited.value.code == 2
    assert "argument --log-level: invalid choice: 'chatty'" in capsys.readouterr().err


def test_a_bad_variable_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(cli.LOG_LEVEL_ENV, "loud")
    assert operator.main([]) == 2  # before connecting to anything
    assert "relay controller: RELAY_LOG_LEVEL='loud' is not a log level (one of debug, info" in capsys.readouterr().err
    assert cli.run_command(["worker"]) == cli.EXIT_BAD_INPUT
    assert "relay: RELAY_LOG_LEVEL='loud' is not a log level" in capsys.readouterr().err


async def _publish_a_preemption_and_a_start() -> RecordingSink:
    inner = RecordingSink()
    status = RunStatus(legs=[LegStatus(leg=0, outcome="preempted"), LegStatus(leg=1)])
    events = [
        RunEvent(type="Warning", reason="Preempted", message="leg 0 preempted (Evicted); resuming from step 40"),
        RunEvent(reason="Resumed", message="leg 1 resumed from checkpoint step 40"),
    ]
    await RunEventLog(inner).publish("ml", "bert", status, events)
    return inner


@pytest.mark.anyio
async def test_each_run_event_is_one_log_line_naming_the_run_leg_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="relay.events"):
        inner = await _publish_a_preemption_and_a_start()
    assert [event.reason for event in inner.published[0][2]] == ["Preempted", "Resumed"], "handed on unchanged"
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "relay.events"]
    assert lines == [
        ("WARNING", "ml/bert leg 1 Preempted: leg 0 preempted (Evicted); resuming from step 40"),
        ("INFO", "ml/bert leg 1 Resumed: leg 1 resumed from checkpoint step 40"),
    ]


@pytest.mark.anyio
async def test_the_controllers_default_level_prints_run_events_and_runs_does_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(cli.LOG_LEVEL_ENV, raising=False)
    try:
        cli.setup_logging(_level(operator.build_parser().parse_args([])), timestamps=True)
        await _publish_a_preemption_and_a_start()
        err = capsys.readouterr().err
        assert "INFO relay.events: ml/bert leg 1 Resumed: leg 1 resumed from checkpoint step 40" in err
        assert "WARNING relay.events: ml/bert leg 1 Preempted" in err
        assert logging.getLogger("kopf").getEffectiveLevel() == logging.WARNING, "kopf's per-handler lines stay out"
        cli.setup_logging(_level(cli.build_parser().parse_args(["run", "run.yaml"])))
        await _publish_a_preemption_and_a_start()
        err = capsys.readouterr().err
        assert "Resumed" not in err and "relay: WARNING ml/bert leg 1 Preempted" in err
    finally:
        logging.getLogger().handlers.clear()
        logging.getLogger("kopf").setLevel(logging.NOTSET)


def test_a_record_of_several_lines_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RELAY_DEBUG", raising=False)
    try:
        cli.setup_logging("info", timestamps=True)
        logging.getLogger("relay.controller.leader").warning("lease ml/relay: (403)\nReason: Forbidden\n\nbody")
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.rstrip().endswith("lease ml/relay: (403) | Reason: Forbidden | body")
    finally:
        logging.getLogger().handlers.clear()
        logging.getLogger("kopf").setLevel(logging.NOTSET)
