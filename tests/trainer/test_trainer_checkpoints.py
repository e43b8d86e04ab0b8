"""Checkpoints written by real training: their contents, quarantine of corrupt / truncated / manifest-less ones
on resume (the previous one is used and the run still ends bit-identical), and retention during a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from trainer_helpers import sha256, write_config

from trainer.__main__ import main
from trainer.volume import ExitCode, RunLayout, list_checkpoint_dirs, list_quarantined, read_checkpoint, read_progress

SETTINGS = {"maxSteps": 12, "checkpointEverySteps": 3, "keepLast": 10}


def train(run_dir: Path, snapshot: Path, config: Path) -> int:
    return main(["train", "--run-dir", str(run_dir), "--snapshot", str(snapshot), "--config", str(config)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, snapshot: Path) -> Path:
    """A finished 12-step run with a checkpoint every 3 steps, all kept."""
    folder = tmp_path_factory.mktemp("reference")
    assert train(folder / "run", snapshot, write_config(folder / "config.json", **SETTINGS)) == ExitCode.COMPLETE
    return folder / "run"


def test_checkpoint_holds_the_full_training_state(reference: Path) -> None:
    layout = RunLayout(reference)
    assert [step for step, _ in list_checkpoint_dirs(layout.checkpoints_dir)] == [3, 6, 9, 12]
    info = read_checkpoint(layout.checkpoints_dir / "step-000000006", verify_hashes=True)
    names = {entry.path for entry in info.files}
    assert names == {
        "model.safetensors",
        "optimizer.exp_avg.safetensors",
        "optimizer.exp_avg_sq.safetensors",
        "optimizer.step.safetensors",
        "optimizer.json",
        "rng.json",
        "trainer_state.json",
        "config.json",
        "model_config.json",
    }
    # What the controller reads without torch: position, totals, thread count, loss.
    assert info.epoch == 0 and info.extra["batch_in_epoch"] == 6 and info.extra["total_steps"] == 12
    assert info.extra["torch_threads"] == 1 and info.extra["emergency"] is False
    assert info.metrics["loss"] > 0 and info.metrics["learning_rate"] > 0
    state = json.loads((info.path / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["scheduler"]["last_epoch"] == 6 and state["seed"] == 7
    rng = json.loads((info.path / "rng.json").read_text())
    assert set(rng) == {"python", "numpy", "torch_cpu", "cuda"} and len(rng["torch_cpu"]) > 1000
    with safe_open(str(info.path / "optimizer.exp_avg_sq.safetensors"), "pt") as handle:  # one per parameter
        moments = list(handle.keys())
        assert len(moments) == 41 and all(str(handle.get_tensor(k).dtype) == "torch.float32" for k in moments)
    groups = json.loads((info.path / "optimizer.json").read_text())["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert abs(groups[0]["lr"] - info.metrics["learning_rate"]) < 1e-12


def test_bad_checkpoints_quarantined_and_previous_used(
    reference: Path, snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "final")  # as if the leg had died after its last checkpoint
    checkpoints = RunLayout(run_dir).checkpoints_dir
    corrupt = checkpoints / "step-000000012" / "model.safetensors"
    content = bytearray(corrupt.read_bytes())
    content[-10] ^= 0x01
    corrupt.write_bytes(bytes(content))
    truncated = checkpoints / "step-000000009" / "optimizer.exp_avg.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    (checkpoints / "step-000000006" / "manifest.json").unlink()
    capsys.readouterr()

    assert train(run_dir, snapshot, write_config(tmp_path / "config.json", **SETTINGS)) == ExitCode.COMPLETE
    log = capsys.readouterr().err
    assert "start: resumed from checkpoint step 3 " in log
    for step in (12, 9, 6):
        assert f"checkpoint step {step} quarantined to " in log
    reasons = {q.step: q.reason for q in list_quarantined(RunLayout(run_dir).quarantine_dir)}
    assert "model.safetensors: xxh3_128 does not match manifest (corrupt)" in reasons[12]
    assert "optimizer.exp_avg.safetensors: size 1000 !=" in reasons[9]
    assert "manifest.json: missing" in reasons[6]
    assert read_progress(RunLayout(run_dir))["resumed_from_step"] == 3
    # Resumed from step 3, the run retrained steps 4..12 to the same weights.
    assert sha256(run_dir / "final" / "model.safetensors") == sha256(reference / "final" / "model.safetensors")


def test_retention_keeps_last_k_best_and_newest(snapshot: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.json", maxSteps=16, checkpointEverySteps=2, keepLast=2)
    assert train(tmp_path / "run", snapshot, config) == ExitCode.COMPLETE
    checkpoints = RunLayout(tmp_path / "run").checkpoints_dir
    kept = [read_checkpoint(folder, verify_hashes=True) for _, folder in list_checkpoint_dirs(checkpoints)]
    steps = [c.step for c in kept]
    assert steps[-2:] == [14, 16], "the last two, the newest among them"
    assert len(steps) <= 3
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]


def test_finished_run_restarted_exits_0_without_training(
    reference: Path, snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = sha256(run_dir / "final" / "model.safetensors")
    capsys.readouterr()
    assert train(run_dir, snapshot, write_config(tmp_path / "config.json", **SETTINGS)) == ExitCode.COMPLETE
    assert "start: already complete" in capsys.readouterr().err
    assert sha256(run_dir / "final" / "model.safetensors") == before
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert set(metrics) >= {"accuracy", "f1_macro", "loss", "train_loss", "steps", "epochs"}
    assert metrics["steps"] == 12 and 0.0 <= metrics["accuracy"] <= 1.0
    assert read_checkpoint(run_dir / "final", verify_hashes=True).extra == {"kind": "final"}


def test_sigterm_during_evaluation_resumes_into_evaluation(
    reference: Path, snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "config.json", **SETTINGS)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("RELAY_TEST_SIGTERM_DURING_EVAL", "1")
    assert train(run_dir, snapshot, config) == ExitCode.PREEMPTED
    assert "SIGTERM during evaluation" in capsys.readouterr().err
    assert not (run_dir / "final").exists()
    assert read_progress(RunLayout(run_dir))["state"] == "preempted"
    monkeypatch.delenv("RELAY_TEST_SIGTERM_DURING_EVAL")
    assert train(run_dir, snapshot, config) == ExitCode.COMPLETE
    assert "start: resumed from checkpoint step 12 " in capsys.readouterr().err
    assert sha256(run_dir / "final" / "model.safetensors") == sha256(reference / "final" / "model.safetensors")


def test_time_based_checkpoints_and_progress_file(snapshot: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.json", maxSteps=6, checkpointEverySteps=None, checkpointEverySeconds=1e-6, keepLast=10
    )
    assert train(tmp_path / "run", snapshot, config) == ExitCode.COMPLETE
    steps = [step for step, _ in list_checkpoint_dirs(RunLayout(tmp_path / "run").checkpoints_dir)]
    assert steps == [1, 2, 3, 4, 5, 6], "every step is more than a microsecond after the previous checkpoint"
    progress = read_progress(RunLayout(tmp_path / "run"))
    assert progress is not None
    assert set(progress) >= {
        "state",
        "step",
        "total_steps",
        "epoch",
        "loss",
        "learning_rate",
        "samples_per_s",
        "eta_s",
        "last_checkpoint_step",
        "resumed_from_step",
        "pid",
        "message",
    }
    assert progress["state"] == "completed" and progress["step"] == progress["total_steps"] == 6
    assert progress["last_checkpoint_step"] == 6 and progress["resumed_from_step"] is None
    assert progress["samples_per_s"] > 0 and progress["eta_s"] == 0 and progress["epoch"] == 0.3
