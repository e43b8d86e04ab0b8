"""`relay plot NAME --sweep`: a sweep in one PNG, the objective against step for every trial.

The trials and their fate come from the sweep's status (get_status); each trial's evaluations from its run
folder's history.jsonl ("eval" lines during training and the final evaluation), through trainer.volume.
Pruned trials are drawn dashed with a cross at the rung where they were stopped; the best trial is drawn
thick; rungs are dotted vertical lines. matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controller.sweep.activities import eval_value
from controller.sweep.spec import SweepStatus, TrialStatus
from trainer.volume.layout import RunLayout
from trainer.volume.records import read_history

WIDTH_PX, HEIGHT_PX, DPI = 1200, 700, 100
BEST_COLOUR, PRUNED_COLOUR = "#c62828", "#9e9e9e"


def trial_curve(volume_root: Path, namespace: str, trial: str, metric: str) -> list[tuple[int, float]]:
    """(step, objective) of every evaluation of the trial, the newest line per step (resumed legs redo some)."""
    points: dict[int, float] = {}
    for entry in read_history(RunLayout.for_run(volume_root, namespace, trial)):
        if entry.event in ("eval", None):
            value = eval_value(entry, metric)
            if value is not None:
                points[entry.step] = value
    return sorted(points.items())


def plot_sweep(status: SweepStatus, volume_root: Path, namespace: str, name: str, output: Path) -> Path:
    """Draw every trial's objective against step into `output` (PNG, WIDTH_PX x HEIGHT_PX)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = status.best.metric if status.best else "eval_loss"
    fig, ax = plt.subplots(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
    try:
        rungs = sorted({int(step) for trial in status.trials for step in trial.rung_metrics})
        for step in rungs[:-1]:
            ax.axvline(step, color="#bdbdbd", linestyle=":", linewidth=1)
        for trial in status.trials:
            _draw_trial(ax, trial, trial_curve(volume_root, namespace, trial.name, metric), status)
        best = status.best
        title = f"TrainingSweep {namespace}/{name}: {metric} of every trial"
        if best is not None:
            title += f"; best {best.name}, {best.value:.4f} at step {best.step}"
        ax.set_title(title, loc="left", fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return output


def _draw_trial(ax: Any, trial: TrialStatus, curve: list[tuple[int, float]], status: SweepStatus) -> None:
    if not curve:
        return
    steps, values = [s for s, _ in curve], [v for _, v in curve]
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(trial.params.items()))
    label = f"{trial.name} ({params}) {trial.state}"
    if status.best is not None and trial.name == status.best.name:
        ax.plot(steps, values, color=BEST_COLOUR, linewidth=3, marker="o", label=f"{label}, best", zorder=3)
    elif trial.state == "pruned":
        ax.plot(steps, values, color=PRUNED_COLOUR, linestyle="--", marker=".", label=label)
        # The cross is where it was compared and stopped; its leg may have trained a few steps on before it paused.
        at = (trial.step, trial.metric) if trial.metric is not None else (steps[-1], values[-1])
        ax.plot(*at, color=PRUNED_COLOUR, marker="x", markersize=12, markeredgewidth=2)
    else:
        ax.plot(steps, values, linewidth=1.5, marker="o", label=label)
