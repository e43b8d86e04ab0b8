"""Evaluation on the eval split: accuracy, macro F1 and mean cross-entropy of the model as it stands."""

from __future__ import annotations

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
    with torch.no_grad():
        for indices in data_mod.eval_batches(data, batch_size):
            if stop.requested:
                raise Preempted(f"{stop.signal_name} during evaluation; checkpoint of the last step holds the run")
            batch = {k: v.to(learner.device) for k, v in data_mod.collate(data, indices).items()}
            labels = batch.pop("labels")
            with learner.autocast():
                logits = model(**batch).logits.float()
            total_loss += float(functional.cross_entropy(logits, labels, reduction="sum").item())
            predictions.extend(int(p) for p in logits.argmax(dim=-1).tolist())
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
