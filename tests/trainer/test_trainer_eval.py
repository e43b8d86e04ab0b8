"""Evaluation during training (issue 15): eval records at the evalEverySteps steps, in the history and in the
manifest of the checkpoint of that step; a run resumed (after a SIGKILL, and after a SIGTERM inside an
evaluation) evaluates the same steps with the same results and ends with the same weights; evaluating changes no
weight; retention keeps the best checkpoint; loadBestAtEnd puts the best model in final/; earlyStoppingPatience
completes the run early with the reason. Real trainer processes, the tiny model, one torch thread."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from trainer_helpers import run_train, sha256, start_train, write_config

from trainer.faults import Faults
from trainer.volume import (
    CheckpointInvalid,
    ExitCode,
    RunLayout,
    list_checkpoint_dirs,
    read_checkpoint,
    read_history,
    read_progress,
)

# 160 train rows / batch 8 = 20 steps per epoch, 2 epochs = 40 steps; evaluations at 5, 10, ..., 35 (40 is the
# final evaluation); checkpoints every 10.
TOTAL_STEPS = 40
EVAL_SETTINGS: dict[str, Any] = {"evalEverySteps": 5, "checkpointEverySteps": 10, "keepLast": 10}
EVAL_STEPS = [5, 10, 15, 20, 25, 30, 35]
METRICS = ("eval_loss", "accuracy", "f1_macro")


def eval_records(run_dir: Path) -> dict[int, dict[str, float]]:
    """The newest "eval" history line per step (a resumed leg may write a step again), its three metrics."""
    records: dict[int, dict[str, float]] = {}
    for entry in read_history(RunLayout(run_dir)):
        if entry.event == "eval":
            assert entry.eval_loss is not None and entry.eval_accuracy is not None and entry.eval_f1_macro is not None
            records[entry.step] = {
                "eval_loss": entry.eval_loss,
                "accuracy": entry.eval_accuracy,
                "f1_macro": entry.eval_f1_macro,
            }
    return records


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [step for step, _ in list_checkpoint_dirs(RunLayout(run_dir).checkpoints_dir)]


def final_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "final" / "metrics.json").read_text(encoding="utf-8"))


def trained(folder: Path, snapshot: Path, **settings: Any) -> Path:
    config = write_config(folder / "config.json", **settings)
    result = run_train(folder / "run", snapshot, config)
    assert result.returncode == ExitCode.COMPLETE, result.stderr
    return folder / "run"


@pytest.fixture(scope="module")
def without_eval(tmp_path_factory: pytest.TempPathFactory, snapshot: Path) -> Path:
    return trained(tmp_path_factory.mktemp("without-eval"), snapshot, checkpointEverySteps=10)


@pytest.fixture(scope="module")
def with_eval(tmp_path_factory: pytest.TempPathFactory, snapshot: Path) -> Path:
    return trained(tmp_path_factory.mktemp("with-eval"), snapshot, **EVAL_SETTINGS)


def test_eval_records_at_the_cadence_and_in_the_checkpoints_of_those_steps(with_eval: Path) -> None:
    records = eval_records(with_eval)
    assert sorted(records) == EVAL_STEPS
    for step in (10, 20, 30):  # evaluated and checkpointed: the manifest carries that evaluation
        info = read_checkpoint(with_eval / "checkpoints" / f"step-{step:09d}", verify_hashes=True)
        assert {key: info.metrics[key] for key in METRICS} == records[step]
    last = read_checkpoint(with_eval / "checkpoints" / f"step-{TOTAL_STEPS:09d}", verify_hashes=True)
    assert not set(METRICS) & set(last.metrics)  # the last step has the final evaluation, in final/
    final_line = [e for e in read_history(RunLayout(with_eval)) if e.step == TOTAL_STEPS and e.eval_loss is not None]
    assert final_line and final_line[-1].event is None and final_line[-1].eval_f1_macro is not None
    assert final_metrics(with_eval)["steps"] == TOTAL_STEPS


def test_evaluating_changes_no_weight(with_eval: Path, without_eval: Path) -> None:
    assert sha256(with_eval / "final" / "model.safetensors") == sha256(without_eval / "final" / "model.safetensors")
    on, off = final_metrics(with_eval), final_metrics(without_eval)
    assert {k: on[k] for k in ("accuracy", "f1_macro", "loss", "train_loss")} == {
        k: off[k] for k in ("accuracy", "f1_macro", "loss", "train_loss")
    }


def wait_for(run_dir: Path, condition: Any, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = read_progress(RunLayout(run_dir)) or {}
        if condition(progress):
            return
        time.sleep(0.02)
    raise AssertionError(f"{run_dir}: progress never matched; last {read_progress(RunLayout(run_dir))}")


def test_resumed_run_evaluates_the_same_steps_with_the_same_results(
    with_eval: Path, snapshot: Path, tmp_path: Path
) -> None:
    """SIGKILL after step 13 (resume from 10), then SIGTERM inside the evaluation of step 15 (exit 75, step 15
    saved without it), then to the end: the records and the weights equal the uninterrupted run's."""
    config = write_config(tmp_path / "config.json", **EVAL_SETTINGS)
    run_dir = tmp_path / "run"
    # The step sleeps give checkpoint 10's write (off-thread) time to finish before the SIGKILL.
    leg = run_train(run_dir, snapshot, config, RELAY_TEST_KILL_AFTER_STEP="13", RELAY_TEST_STEP_SLEEP_S="0.2")
    assert leg.returncode == -signal.SIGKILL, leg.stderr
    assert checkpoint_steps(run_dir) == [10], leg.stderr

    process = start_train(run_dir, snapshot, config, RELAY_TEST_EVAL_BATCH_SLEEP_S="0.5")
    wait_for(run_dir, lambda p: p.get("state") == "evaluating" and p.get("message") == "evaluating step 15")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == ExitCode.PREEMPTED, stderr
    assert "start: resumed from checkpoint step 10" in stderr
    assert "preempted: SIGTERM received; finished step 15 and saved checkpoint step 15" in stderr
    interrupted = read_checkpoint(run_dir / "checkpoints" / "step-000000015", verify_hashes=True)
    assert interrupted.extra["emergency"] is True and "eval_loss" not in interrupted.metrics
    assert 15 not in eval_records(run_dir)

    leg = run_train(run_dir, snapshot, config)
    assert leg.returncode == ExitCode.COMPLETE, leg.stderr
    assert "start: resumed from checkpoint step 15" in leg.stderr
    assert leg.stderr.index("eval step 15 ") < leg.stderr.index("step 20/40")  # the step's evaluation first
    expected = eval_records(with_eval)
    assert eval_records(run_dir) == expected
    redone = read_checkpoint(run_dir / "checkpoints" / "step-000000015", verify_hashes=True)
    assert {key: redone.metrics[key] for key in METRICS} == expected[15]  # added once the evaluation was redone
    assert sha256(run_dir / "final" / "model.safetensors") == sha256(with_eval / "final" / "model.safetensors")
    assert final_metrics(run_dir)["loss"] == final_metrics(with_eval)["loss"]


@pytest.mark.parametrize(("metric", "sign"), [("eval_loss", 1.0), ("accuracy", -1.0)])
def test_best_checkpoint_kept_by_retention_and_loaded_at_end(
    snapshot: Path, tmp_path: Path, metric: str, sign: float
) -> None:
    """accuracy: this data gives equal values at several steps; the earliest of them is the best, for the
    tracker and for retention alike (retention once kept the newest and deleted the one loadBestAtEnd wanted)."""
    run_dir = trained(
        tmp_path,
        snapshot,
        **{**EVAL_SETTINGS, "keepLast": 1, "metricForBest": metric, "loadBestAtEnd": True},
    )
    records = eval_records(run_dir)
    assert sorted(records) == EVAL_STEPS
    metrics = final_metrics(run_dir)
    final_line = [e for e in read_history(RunLayout(run_dir)) if e.step == TOTAL_STEPS and e.eval_loss][-1]
    final_value = final_line.eval_loss if metric == "eval_loss" else final_line.eval_accuracy
    candidates = {**{step: r[metric] for step, r in records.items()}, TOTAL_STEPS: final_value}
    best = min(candidates, key=lambda step: (sign * candidates[step], step))
    assert best < TOTAL_STEPS, f"this data's best is the last step; the test needs an earlier one: {candidates}"
    assert metrics["best_step"] == metrics["model_step"] == best
    assert metrics[f"best_{metric}"] == records[best][metric]
    assert metrics["loss"] == records[best]["eval_loss"]  # final/'s metrics are the best model's
    # Every evaluated step was checkpointed; retention kept the newest and the best only (keepLast 1).
    assert checkpoint_steps(run_dir) == sorted({best, TOTAL_STEPS})
    best_weights = load_file(str(run_dir / "checkpoints" / f"step-{best:09d}" / "model.safetensors"))
    final_weights = load_file(str(run_dir / "final" / "model.safetensors"))
    assert best_weights.keys() == final_weights.keys()
    assert all(best_weights[name].equal(final_weights[name]) for name in best_weights)
    last_weights = load_file(str(run_dir / "checkpoints" / f"step-{TOTAL_STEPS:09d}" / "model.safetensors"))
    assert not all(last_weights[name].equal(final_weights[name]) for name in last_weights)


def test_early_stopping_completes_the_run_with_the_reason(snapshot: Path, tmp_path: Path) -> None:
    settings = {**EVAL_SETTINGS, "metricForBest": "eval_loss", "earlyStoppingPatience": 2}
    run_dir = trained(tmp_path, snapshot, **settings)
    records = eval_records(run_dir)
    # The first evaluation after which two in a row brought no strict improvement ends the run.
    best, since, stopped = None, 0, None
    for step in sorted(records):
        value = records[step]["eval_loss"]
        if best is None or value < best:
            best, since = value, 0
        else:
            since += 1
        if since == 2:
            stopped = step
            break
    assert stopped is not None and stopped < TOTAL_STEPS, f"no early stop expected from {records}"
    assert max(records) == stopped
    metrics = final_metrics(run_dir)
    assert (metrics["stop_reason"], metrics["stopped_at_step"], metrics["steps"]) == ("EarlyStopped", stopped, stopped)
    progress = read_progress(RunLayout(run_dir)) or {}
    assert progress["state"] == "completed" and progress["step"] == stopped
    assert f"early stopped at step {stopped} of {TOTAL_STEPS}" in progress["message"]
    assert read_checkpoint(run_dir / "final", verify_hashes=True).step == stopped
    # Run again with the same arguments: complete, nothing redone.
    again = run_train(run_dir, snapshot, tmp_path / "config.json")
    assert again.returncode == ExitCode.COMPLETE and "already complete" in again.stderr


def test_the_eval_pause_variable_is_parsed() -> None:
    assert Faults.from_env({"RELAY_TEST_EVAL_BATCH_SLEEP_S": "0.5"}) == Faults(eval_batch_sleep_s=0.5)


def test_histories_written_before_and_with_eval_records_both_load(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    layout.history_path.write_text(
        '{"step": 0, "event": "start", "time": 1.0, "pid": 7}\n'  # before issue 15
        '{"step": 40, "eval_loss": 0.6, "eval_accuracy": 0.7, "time": 2.0}\n'
        '{"step": 5, "event": "eval", "eval_loss": 0.7, "eval_accuracy": 0.5, "eval_f1_macro": 0.4, "best_step": 5}\n',
        encoding="utf-8",
    )
    start, final, evaluation = read_history(layout)
    assert (start.event, final.event, final.eval_f1_macro) == ("start", None, None)
    assert (evaluation.event, evaluation.eval_f1_macro, evaluation.best_step) == ("eval", 0.4, 5)


def test_a_manifest_without_eval_metrics_loads_and_takes_them(tmp_path: Path) -> None:
    """Checkpoints made before issue 15 (or not evaluated) load as before; an evaluation redone after its step
    was saved adds its metrics to that manifest, and the files still verify."""
    from trainer.volume import write_manifest
    from trainer.volume.manifests import add_manifest_metrics

    folder = tmp_path / "step-000000005"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    write_manifest(folder, step=5, epoch=0, config_hash="h", metrics={"loss": 0.5})
    assert read_checkpoint(folder, verify_hashes=True).metrics == {"loss": 0.5}
    add_manifest_metrics(folder, {"eval_loss": 0.6, "accuracy": 0.75, "f1_macro": 0.7})
    info = read_checkpoint(folder, verify_hashes=True)
    assert info.metrics == {"loss": 0.5, "eval_loss": 0.6, "accuracy": 0.75, "f1_macro": 0.7}
    (folder / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointInvalid, match=r"manifest\.json: unreadable manifest"):
        add_manifest_metrics(folder, {"eval_loss": 0.6})
