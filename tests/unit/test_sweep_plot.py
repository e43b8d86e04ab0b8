"""`relay plot --sweep`'s drawing: each trial's curve from its history.jsonl eval lines, newest line per step."""

from __future__ import annotations

from pathlib import Path

from controller.sweep.plot import plot_sweep, trial_curve
from controller.sweep.spec import BestTrial, SweepStatus, TrialStatus
from trainer.volume.layout import RunLayout
from trainer.volume.records import HistoryEntry, append_history


def _history(volume: Path, trial: str, lines: list[HistoryEntry]) -> None:
    layout = RunLayout.for_run(volume, "default", trial)
    layout.run_dir.mkdir(parents=True)
    for line in lines:
        append_history(layout, line)


def test_a_sweep_plot_draws_every_trial(tmp_path: Path) -> None:
    _history(
        tmp_path,
        "s-t000",
        [
            HistoryEntry(step=5, loss=0.9),  # a progress line: no eval
            HistoryEntry(step=10, event="eval", eval_loss=0.70, eval_accuracy=0.5, eval_f1_macro=0.4),
            HistoryEntry(step=10, event="eval", eval_loss=0.69, eval_accuracy=0.5, eval_f1_macro=0.4),  # redone
            HistoryEntry(step=20, eval_loss=0.60, eval_accuracy=0.6),  # the final evaluation
        ],
    )
    _history(tmp_path, "s-t001", [HistoryEntry(step=10, event="eval", eval_loss=0.8, eval_accuracy=0.4)])
    assert trial_curve(tmp_path, "default", "s-t000", "eval_loss") == [(10, 0.69), (20, 0.60)]
    assert trial_curve(tmp_path, "default", "s-t001", "accuracy") == [(10, 0.4)]
    assert trial_curve(tmp_path, "default", "s-t002", "eval_loss") == []  # never started: no history
    status = SweepStatus(
        phase="Succeeded",
        trials=[
            TrialStatus(index=0, name="s-t000", state="completed", step=20, metric=0.6, rung_metrics={"10": 0.69}),
            TrialStatus(index=1, name="s-t001", state="pruned", step=10, metric=0.8, rung_metrics={"10": 0.8}),
            TrialStatus(index=2, name="s-t002", state="pending"),
        ],
        best=BestTrial(name="s-t000", index=0, metric="eval_loss", value=0.6, step=20),
    )
    output = plot_sweep(status, tmp_path, "default", "s", tmp_path / "out/sweep.png")
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 10_000
