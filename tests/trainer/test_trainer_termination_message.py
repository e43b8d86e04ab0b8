"""The trainer's termination message: on exit 1 and 65 one line saying why, in the file $RELAY_TERMINATION_LOG
names (Kubernetes' /dev/termination-log), written in place over space reserved beforehand; nothing otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import write_config

from trainer.__main__ import main
from trainer.volume import TERMINATION_LOG_ENV, ExitCode, RunLayout, read_termination_message


def train(run_dir: Path, snapshot: Path, config: Path) -> int:
    return main(["train", "--run-dir", str(run_dir), "--snapshot", str(snapshot), "--config", str(config)])


def test_an_error_found_at_run_time_is_named_with_its_exception_type(
    snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoints folder is a file: nothing checks that up front, the first checkpoint write fails."""
    run_dir = tmp_path / "run"
    RunLayout(run_dir).checkpoints_dir.parent.mkdir(parents=True)
    RunLayout(run_dir).checkpoints_dir.write_text("not a folder")
    termination_log = tmp_path / "termination-log"
    termination_log.write_bytes(b"\0" * 4096)  # space reserved by a supervisor, nothing written yet
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(termination_log))
    config = write_config(tmp_path / "config.json", maxSteps=4, checkpointEverySteps=2)
    assert train(run_dir, snapshot, config) == ExitCode.FAILED
    checkpoints = RunLayout(run_dir).checkpoints_dir
    assert termination_log.read_text() == f"FileExistsError: [Errno 17] File exists: '{checkpoints}'\n"
    assert read_termination_message(termination_log) == f"FileExistsError: [Errno 17] File exists: '{checkpoints}'"


def test_invalid_input_writes_the_trainers_own_line(
    snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    termination_log = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(termination_log))
    config = write_config(tmp_path / "config.json", textField="review")
    assert train(tmp_path / "run", snapshot, config) == ExitCode.INVALID_INPUT
    logged = [
        line.split("invalid input: ", 1)[1]
        for line in capsys.readouterr().err.splitlines()
        if "invalid input: " in line
    ]
    message = read_termination_message(termination_log)
    assert message == logged[-1]
    assert message == "textField: column 'review' not in snapshot split 'train' (columns: text, label)"


def test_without_the_variable_nothing_is_written(
    snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TERMINATION_LOG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "config.json", textField="review")
    assert train(tmp_path / "run", snapshot, config) == ExitCode.INVALID_INPUT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "run"]


def test_a_usage_error_is_invalid_input_with_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    termination_log = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(termination_log))
    with pytest.raises(SystemExit) as exited:
        main(["train", "--run-dir", str(tmp_path / "run")])
    assert exited.value.code == ExitCode.INVALID_INPUT
    assert read_termination_message(termination_log) == (
        "python -m trainer train: the following arguments are required: --snapshot, --config"
    )
