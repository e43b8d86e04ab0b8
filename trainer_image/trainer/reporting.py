"""Progress a person reads in `kubectl logs` and the machine-readable `<run-dir>/progress.json`.

Every log line and every checkpoint also rewrites progress.json (small, fsynced, atomic), which the controller
polls. `<run-dir>/history.jsonl` gets one JSON line per progress log line, one per evaluation during training
(`"event": "eval"`), one for the final evaluation, an `"event": "start"` line (with `resumed_from`) when a leg
begins and an `"event": "checkpoint"` line per checkpoint saved. It is not fsynced (a SIGKILL may drop the last
lines); a resumed leg appends the steps it redoes again, readers keep the newest line per step. Both are typed
records of the volume contract (`trainer.volume.records`: Progress, HistoryEntry), validated on writing; their
fields are documented there.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from trainer.volume import (
    PROGRESS_STATES,
    CheckpointInfo,
    HistoryEntry,
    RunLayout,
    append_history,
    write_progress,
)

log = logging.getLogger("trainer")

STATES = PROGRESS_STATES


def setup_logging() -> None:
    """One readable line per event on stderr, UTC timestamps."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger("trainer")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    if seconds < 10:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Reporter:
    """Keeps the progress fields, writes progress.json, and logs the progress and checkpoint lines."""

    def __init__(self, layout: RunLayout) -> None:
        self.layout = layout
        self.fields: dict[str, Any] = {
            "state": "starting",
            "step": 0,
            "total_steps": None,
            "epoch": 0.0,
            "loss": None,
            "learning_rate": None,
            "samples_per_s": None,
            "eta_s": None,
            "last_checkpoint_step": None,
            "resumed_from_step": None,
            "pid": os.getpid(),
            "message": "",
        }
        self.steps_per_epoch = 1
        self.log_every = 10
        self.stalls: dict[int, float] = {}
        self._window_started = time.perf_counter()
        self._window_steps = 0
        self._window_samples = 0
        self._window_loss = 0.0

    def history(self, **entry: Any) -> None:
        """Append one line to history.jsonl (a HistoryEntry; one write call, so a reader never sees half a line)."""
        append_history(self.layout, HistoryEntry(**entry, time=round(time.time(), 3), pid=os.getpid()))

    def update(self, **changes: Any) -> None:
        if "state" in changes and changes["state"] not in STATES:
            raise ValueError(f"unknown progress state {changes['state']!r}")
        self.fields.update(changes)
        write_progress(self.layout, self.fields)

    def begin(
        self,
        *,
        total_steps: int,
        steps_per_epoch: int,
        batch_size: int,
        step: int,
        resumed_from: int | None,
        last_checkpoint_step: int | None,
        log_every: int,
    ) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.log_every = log_every
        self._window_started = time.perf_counter()
        how = f"resumed from step {resumed_from}" if resumed_from is not None else "fresh start"
        self.history(step=step, event="start", resumed_from=resumed_from, total_steps=total_steps)
        self.update(
            state="running",
            step=step,
            total_steps=total_steps,
            epoch=round(step / steps_per_epoch, 4),
            resumed_from_step=resumed_from,
            last_checkpoint_step=last_checkpoint_step,
            message=how,
        )

    def step_done(self, step: int, loss: float, learning_rate: float, samples: int) -> None:
        self._window_steps += 1
        self._window_samples += samples
        self._window_loss += loss
        total = int(self.fields["total_steps"] or step)
        if step % self.log_every and step != total:
            return
        elapsed = max(time.perf_counter() - self._window_started, 1e-9)
        mean_loss = self._window_loss / self._window_steps
        samples_per_s = self._window_samples / elapsed
        eta = (total - step) * elapsed / self._window_steps
        self._window_started = time.perf_counter()
        self._window_steps, self._window_samples, self._window_loss = 0, 0, 0.0
        epoch = step / self.steps_per_epoch
        last = self.fields["last_checkpoint_step"]
        log.info(
            "step %d/%d (%.1f%%) | epoch %.2f | loss %.4f | lr %.3e | %.1f samples/s | ETA %s | last checkpoint %s",
            step,
            total,
            100.0 * step / total,
            epoch,
            mean_loss,
            learning_rate,
            samples_per_s,
            fmt_duration(eta),
            f"step {last}" if last is not None else "none",
        )
        self.history(
            step=step,
            epoch=round(epoch, 4),
            loss=mean_loss,
            learning_rate=learning_rate,
            samples_per_s=round(samples_per_s, 3),
        )
        self.update(
            state="running",
            step=step,
            epoch=round(epoch, 4),
            loss=mean_loss,
            learning_rate=learning_rate,
            samples_per_s=round(samples_per_s, 3),
            eta_s=round(eta, 1),
        )

    def evaluated(
        self, step: int, metrics: dict[str, float], metric: str | None, best_step: int | None, improved: bool
    ) -> None:
        """An evaluation during training: its log line, its `"event": "eval"` history line, back to running."""
        epoch = step / self.steps_per_epoch
        best = ""
        if metric is not None:
            best = " | new best" if improved else f" | best so far step {best_step}"
        log.info(
            "eval step %d | eval_loss %.4f | accuracy %.4f | f1_macro %.4f%s",
            step,
            metrics["eval_loss"],
            metrics["accuracy"],
            metrics["f1_macro"],
            best,
        )
        self.history(
            step=step,
            event="eval",
            epoch=round(epoch, 4),
            eval_loss=metrics["eval_loss"],
            eval_accuracy=metrics["accuracy"],
            eval_f1_macro=metrics["f1_macro"],
            best_step=best_step,
        )
        self.update(state="running", message=f"evaluated step {step}")

    def checkpoint_saved(
        self, info: CheckpointInfo, stall: float | None = None, slowdown: tuple[float, int] | None = None
    ) -> None:
        """The checkpoint line. `stall`: the training thread's wait; `slowdown`: (extra seconds, steps) that the
        steps overlapping the write took beyond the leg's usual step (checkpoint_policy.WriteOverlap)."""
        stall = stall if stall is not None else self.stalls.pop(info.step, None)
        total = self.fields["total_steps"]
        cost = ""
        if stall is not None and slowdown is not None:
            extra, steps = slowdown
            cost = (
                f" | cost to training {fmt_duration(max(stall + extra, 0.0))}: stalled {fmt_duration(stall)}"
                f" + {extra:+.2f}s over the {steps} step(s) that overlapped the write"
            )
        elif stall is not None:
            cost = f" | training stalled {fmt_duration(stall)}"
        log.info(
            "checkpoint %s saved: step %d/%s | %.1f MB | loss %.4f%s",
            info.path.name,
            info.step,
            total,
            info.total_bytes / 1e6,
            info.metrics.get("loss", float("nan")),
            cost,
        )
        self.history(step=info.step, event="checkpoint")
        self.update(last_checkpoint_step=info.step)
