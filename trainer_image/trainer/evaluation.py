"""Evaluation on the eval split: accuracy, macro F1 and mean cross-entropy of the model as it stands; and the
run's record of its evaluations during training (EvalTracker: the last, the best, the evaluations since the best).

Evaluation draws nothing from the training's random streams (the torch RNG is forked around it), so a run with
evaluations ends with the same weights as one without. The tracker's state is part of every checkpoint's
trainer_state.json, so a resumed run knows which steps were evaluated, which was best and how patient to be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer import data as data_mod
from trainer.errors import Preempted
from trainer.faults import Faults
from trainer.leg_state import Learner
from trainer.preemption import StopRequest


def evaluate(
    learner: Learner, data: data_mod.Encoded, batch_size: int, stop: StopRequest, faults: Faults
) -> dict[str, Any]:
    """Accuracy, macro F1 (over labels present in truth or predictions) and mean cross-entropy; the model is
    back in train mode afterwards. Raises Preempted when a stop is requested before a batch."""
    import torch
    import torch.nn.functional as functional

    model = learner.model
    model.eval()
    total_loss = 0.0
    predictions: list[int] = []
    faults.during_eval()
    # The training's RNG streams come out as they went in (dropout is off here, but nothing is left to chance).
    cuda_devices = [learner.device] if learner.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            for indices in data_mod.eval_batches(data, batch_size):
                if stop.requested:
                    raise Preempted(f"{stop.signal_name} during evaluation; the step before it is saved")
                batch = {k: v.to(learner.device) for k, v in data_mod.collate(data, indices).items()}
                labels = batch.pop("labels")
                with learner.autocast():
                    logits = model(**batch).logits.float()
                total_loss += float(functional.cross_entropy(logits, labels, reduction="sum").item())
                predictions.extend(int(p) for p in logits.argmax(dim=-1).tolist())
                faults.after_eval_batch()
    finally:
        model.train()
    return classification_metrics(data.labels, predictions) | {"loss": total_loss / data.rows, "eval_rows": data.rows}


def classification_metrics(truth: list[int], predictions: list[int]) -> dict[str, float]:
    """Accuracy and macro F1 over the labels present in truth or predictions."""
    correct = sum(t == p for t, p in zip(truth, predictions, strict=True))
    f1_scores = []
    for label in sorted(set(truth) | set(predictions)):
        tp = sum(t == label and p == label for t, p in zip(truth, predictions, strict=True))
        fp = sum(t != label and p == label for t, p in zip(truth, predictions, strict=True))
        fn = sum(t == label and p != label for t, p in zip(truth, predictions, strict=True))
        f1_scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": correct / len(truth), "f1_macro": sum(f1_scores) / len(f1_scores)}


# An evaluation's metrics as the history, the manifests and metricForBest name them.
EVAL_METRIC_KEYS = ("eval_loss", "accuracy", "f1_macro")


def named_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """evaluate()'s result under the names of EVAL_METRIC_KEYS (its "loss" is the eval loss)."""
    return {
        "eval_loss": float(metrics["loss"]),
        "accuracy": float(metrics["accuracy"]),
        "f1_macro": float(metrics["f1_macro"]),
    }


@dataclass
class EvalTracker:
    """The evaluations during training: their cadence, the last and the best result, and the patience left.

    `last` and `best` are {"step": S, "eval_loss": .., "accuracy": .., "f1_macro": ..}. Improvement is strict:
    of equal results the earlier step stays the best.
    """

    every_steps: int | None
    metric: str | None
    higher_is_better: bool
    patience: int | None
    last: dict[str, float] | None = None
    best: dict[str, float] | None = None
    evals_since_best: int = 0

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the state after `step` steps is evaluated during training (the last step has the final
        evaluation instead)."""
        return self.every_steps is not None and step % self.every_steps == 0 and 0 < step < total_steps

    def pending(self, step: int, total_steps: int) -> bool:
        """Due at `step` and not done yet (a leg stopped during it, or before it)."""
        return self.due(step, total_steps) and not self.evaluated(step)

    def evaluated(self, step: int) -> bool:
        return self.last is not None and int(self.last["step"]) == step

    def record(self, step: int, metrics: dict[str, float]) -> bool:
        """Note the evaluation of `step`; returns whether it is the new best by `metric`."""
        entry = {"step": float(step), **{key: float(metrics[key]) for key in EVAL_METRIC_KEYS}}
        self.last = entry
        if self.metric is None:
            return False
        if self.best is None or self._better(entry[self.metric], self.best[self.metric]):
            self.best, self.evals_since_best = entry, 0
            return True
        self.evals_since_best += 1
        return False

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    @property
    def should_stop(self) -> bool:
        """earlyStoppingPatience evaluations in a row brought no improvement."""
        return self.patience is not None and self.evals_since_best >= self.patience

    @property
    def best_step(self) -> int | None:
        return int(self.best["step"]) if self.best is not None else None

    def metrics_at(self, step: int) -> dict[str, float]:
        """The eval metrics of `step` for its checkpoint's manifest ({} when `step` was not evaluated)."""
        if self.last is None or not self.evaluated(step):
            return {}
        return {key: self.last[key] for key in EVAL_METRIC_KEYS}

    def to_state(self) -> dict[str, Any]:
        """What trainer_state.json keeps ("evaluation"), so a resumed leg carries on with the same record."""
        return {"last": self.last, "best": self.best, "evals_since_best": self.evals_since_best}

    def restore(self, state: dict[str, Any] | None) -> None:
        """From a checkpoint's trainer_state.json "evaluation" (absent in checkpoints made without it)."""
        if not state:
            return
        self.last, self.best = state.get("last"), state.get("best")
        self.evals_since_best = int(state.get("evals_since_best", 0))
