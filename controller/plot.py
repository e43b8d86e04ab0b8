"""`relay plot`: a run's story in one PNG, drawn only from its run folder (so local and Kubernetes runs alike).

Reads `history.jsonl` (training loss per logged step, the final evaluation), `legs/<n>.json` (each leg's
start and end step and outcome), `checkpoints/*/manifest.json`, `quarantine/*` and `final/metrics.json`, all
through `trainer.volume` (RunLayout and its typed record readers).
Top: training loss against step, eval loss/accuracy where present, legs shaded, resumes marked with the
step they resumed from. Bottom: one bar per leg (how it ended), checkpoints as ticks, quarantined ones
flagged. matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.volume import (
    MANIFEST_NAME,
    RunLayout,
    list_checkpoint_dirs,
    list_quarantined,
    read_history,
    read_leg_records,
)

WIDTH_PX, HEIGHT_PX, DPI = 1200, 700, 100
OUTCOME_COLOURS = {
    "completed": "#2e7d32",
    "preempted": "#ef6c00",
    "failed": "#c62828",
    "invalid": "#6a1b9a",
    "stuck": "#6d4c41",
    "running": "#1565c0",
}


class PlotError(ValueError):
    """The run folder cannot be drawn: one line naming the folder or file."""


@dataclass
class RunHistory:
    steps: list[int]
    losses: list[float]
    evals: list[dict[str, float]]
    legs: list[dict[str, Any]]
    checkpoints: list[int]
    saved: list[int]
    quarantined: list[int]
    final_metrics: dict[str, Any]


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlotError(f"{path}: unreadable ({exc})") from None


def read_run(run_dir: Path) -> RunHistory:
    """Everything the picture needs, from the run folder alone (through the volume contract's typed readers)."""
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: no such run folder")
    layout = RunLayout(run_dir)
    latest: dict[int, tuple[float, float]] = {}  # step -> (time, loss); a redone step keeps its newest line
    processes: dict[int, dict[str, float]] = {}  # trainer pid -> first/last time and step it logged
    saved: set[int] = set()  # every checkpoint written, also those retention removed later
    evals: list[dict[str, float]] = []
    for entry in read_history(layout):  # lines cut short by a SIGKILL are skipped
        step, at = entry.step, entry.time
        if entry.pid is not None:
            span = processes.setdefault(entry.pid, {"t0": at, "t1": at, "first": step + 1, "last": step})
            span["t0"], span["t1"] = min(span["t0"], at), max(span["t1"], at)
            if entry.event == "start":
                span["from"] = step  # the step this trainer resumed from (0 on a fresh start)
            else:
                span["first"], span["last"] = min(span["first"], step), max(span["last"], step)
        if entry.event == "checkpoint":
            saved.add(step)
        elif entry.eval_loss is not None:
            evals.append({"step": step, "loss": entry.eval_loss, "accuracy": entry.eval_accuracy})  # type: ignore[dict-item]
        elif entry.loss is not None and (step not in latest or at >= latest[step][0]):
            latest[step] = (at, entry.loss)
    legs = [record.model_dump(mode="json", by_alias=True) for record in read_leg_records(layout)]
    _attach_trained_steps(legs, processes)
    checkpoints = [
        step for step, folder in list_checkpoint_dirs(layout.checkpoints_dir) if (folder / MANIFEST_NAME).is_file()
    ]
    quarantined = sorted(entry.step for entry in list_quarantined(layout.quarantine_dir) if entry.step >= 0)
    metrics_path = layout.final_metrics_path
    final_metrics = _json(metrics_path) if metrics_path.is_file() else {}
    if not latest and not legs:
        raise PlotError(f"{run_dir}: nothing to draw (no history.jsonl lines and no legs/<n>.json records)")
    steps = sorted(latest)
    losses = [latest[s][1] for s in steps]
    return RunHistory(steps, losses, evals, legs, checkpoints, sorted(saved), quarantined, final_metrics)


def _epoch_s(stamp: Any) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _attach_trained_steps(legs: list[dict[str, Any]], processes: dict[int, dict[str, float]]) -> None:
    """Give each leg record the steps its trainer really ran (`ranFrom`, `ranTo`), from history.jsonl.

    A leg's record holds the checkpoints it started and ended at; the steps it trained past its last
    checkpoint before a SIGKILL (lost, redone by the next leg) are only in the history. A trainer process
    belongs to the leg whose start/end times (whole seconds) contain its first logged line; legs take the
    earliest such process not taken by an earlier leg (a trainer logs its first line seconds after launch).
    """
    unused = sorted(processes.values(), key=lambda span: span["t0"])
    for leg in legs:
        start = _epoch_s(leg.get("startedAt"))
        end = _epoch_s(leg.get("endedAt")) if leg.get("endedAt") else None
        for span in unused:
            if start is not None and start - 1 <= span["t0"] and (end is None or span["t0"] <= end + 1):
                leg["ranFrom"] = int(span.get("from", span["first"] - 1))
                leg["ranTo"] = max(int(span["last"]), leg["ranFrom"])
                unused.remove(span)
                break


def plot_run(run_dir: Path, output: Path) -> Path:
    """Draw the run's story into `output` (PNG, WIDTH_PX x HEIGHT_PX)."""
    run = read_run(run_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, sharex=True, height_ratios=[3, 1.4]
    )
    try:
        _draw_loss(top, run)
        _draw_legs(bottom, run)
        title = f"{run_dir.parent.name}/{run_dir.name}"
        if run.final_metrics:
            parts = [
                f"{k} {run.final_metrics[k]:.3f}" for k in ("accuracy", "f1_macro", "loss") if k in run.final_metrics
            ]
            title += "  -  final eval: " + ", ".join(parts)
        top.set_title(title, loc="left", fontsize=11)
        fig.tight_layout()
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return output


def _draw_loss(ax: Any, run: RunHistory) -> None:
    for index, leg in enumerate(run.legs):
        start = leg.get("ranFrom", leg["startStep"])
        end = leg.get("ranTo", leg.get("endStep") if leg.get("endStep") is not None else start)
        ax.axvspan(start, max(end, start + 0.5), color="#90a4ae", alpha=0.08 + 0.10 * (index % 2))
    ax.plot(run.steps, run.losses, color="#1565c0", linewidth=1.2, label="training loss")
    last_label, number = -1e18, 0
    span = max(run.steps[-1] if run.steps else 1, max((leg.get("ranTo", 0) for leg in run.legs), default=1), 1)
    for previous, leg in itertools.pairwise(run.legs):
        if previous.get("outcome") in ("preempted", "failed", "stuck"):
            stopped = previous.get("ranTo", previous.get("endStep"))
            if stopped is not None:
                colour = OUTCOME_COLOURS.get(previous["outcome"], "#ef6c00")
                ax.axvline(stopped, color=colour, linestyle=":", linewidth=1.2)
            resumed = leg.get("ranFrom", leg["startStep"])
            ax.axvline(resumed, color="#2e7d32", linestyle="--", linewidth=1)
            if resumed - last_label < span / 25:
                continue  # too close to the last label to read; the leg bars below say it too
            last_label, number = resumed, number + 1
            ax.annotate(
                f"resumed\nfrom {resumed}",
                (resumed, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -4 - 22 * (number % 2)),  # neighbours alternate heights so they never overlap
                textcoords="offset points",
                fontsize=7,
                color="#2e7d32",
                va="top",
            )
    if run.evals:
        ax.scatter([e["step"] for e in run.evals], [e["loss"] for e in run.evals], color="#c62828", marker="D",
                   zorder=5, label="eval loss")  # fmt: skip
        accuracy = [e for e in run.evals if e.get("accuracy") is not None]
        if accuracy:
            right = ax.twinx()
            right.scatter([e["step"] for e in accuracy], [e["accuracy"] for e in accuracy], color="#6a1b9a",
                          marker="*", s=90, zorder=5, label="eval accuracy")  # fmt: skip
            right.set_ylim(0, 1.05)
            right.set_ylabel("eval accuracy")
    handles: list[Any] = []
    labels: list[str] = []
    for axis in ax.figure.axes:
        if axis.bbox.bounds == ax.bbox.bounds:  # the loss axes and its twin
            more = axis.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
    if len(run.legs) > 1:
        from matplotlib.lines import Line2D

        handles += [Line2D([], [], color="#ef6c00", linestyle=":"), Line2D([], [], color="#2e7d32", linestyle="--")]
        labels += ["leg stopped", "next leg resumed"]
    ax.set_ylabel("loss")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, loc="best", fontsize=8, ncol=3)
    ax.set_xlim(left=0)


def _draw_legs(ax: Any, run: RunHistory) -> None:
    lanes = len(run.legs)
    lost_labelled = False
    for row, leg in enumerate(run.legs):
        y = lanes - row
        start, end = leg.get("ranFrom", leg["startStep"]), leg.get("endStep")
        reached = leg.get("ranTo", end if end is not None else start)
        outcome = str(leg.get("outcome") or "running")
        colour = OUTCOME_COLOURS.get(outcome, "#757575")
        kept = min(end, reached) if end is not None else reached
        if row + 1 < lanes:  # the next leg resumed from here: anything after it was redone
            kept = min(kept, run.legs[row + 1].get("ranFrom", run.legs[row + 1]["startStep"]))
        kept = max(kept, start)
        ax.barh(y, max(kept - start, 0.5), left=start, height=0.6, color=colour, alpha=0.85)
        if reached > kept:  # trained past the step the next leg resumed from: these steps were redone
            lost = "steps redone by the next leg" if not lost_labelled else None
            ax.barh(
                y, reached - kept, left=kept, height=0.6, color="none", edgecolor="#c62828", hatch="////", label=lost
            )
            lost_labelled = True
        label = f"leg {leg.get('leg', row)}: {outcome}"
        if outcome != "completed" and reached is not None:
            label += f" at step {reached}" + (f", {reached - kept} steps redone" if reached > kept else "")
        ax.text(start, y + 0.38, label, fontsize=7, va="bottom")
    removed = [step for step in run.saved if step not in run.checkpoints and step not in run.quarantined]
    if removed:
        ax.plot(removed, [0] * len(removed), "|", color="#b0bec5", markersize=8, label="checkpoints (since removed)")
    ax.plot(run.checkpoints, [0] * len(run.checkpoints), "|", color="#263238", markersize=13, mew=1.5,
            label="checkpoints on the volume")  # fmt: skip
    if run.quarantined:
        ax.plot(run.quarantined, [0] * len(run.quarantined), "x", color="#c62828", markersize=10, mew=2,
                label="quarantined (corrupt)")  # fmt: skip
        for step in run.quarantined:
            ax.annotate(f"{step}", (step, 0), xytext=(4, 4), textcoords="offset points", fontsize=7, color="#c62828")
    ax.set_ylim(-0.8, lanes + 1.0)
    ax.set_yticks([])
    ax.set_xlabel("optimizer step")
    ax.legend(loc="upper right", fontsize=7, ncol=2)
    ax.grid(axis="x", alpha=0.3)
