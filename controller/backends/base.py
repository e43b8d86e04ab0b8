"""The backend interface: launch, observe, stop one training leg; run one batch of predictions.

A leg is one trainer process (`python -m trainer train --run-dir ... --snapshot ... --config ...`)
running somewhere: a child process (LocalBackend) or a Kubernetes Job (KubernetesBackend). Backends
report *what happened* as a LegTermination; `classify_termination` alone decides *what it means*
(completed / preempted / failed / invalid / stuck), so both backends are judged by the same rules.

Predictions run the same way, once: `python -m trainer predict` over a PredictJob's folders. Its texts
go in, and its predictions come back, as files in the request's work folder on the volume
(`prepare_predict_work`, `read_predictions`), so both backends read the same results the same way.

Paths in these models are relative to the volume root (posix); each backend maps them onto its own
mount (a local folder, or the PVC's mountPath inside the pod).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from controller.leg_model import (
    LegHandle,
    LegObservation,
    LegSpec,
    Prediction,
    PredictJob,
)
from trainer.volume import ExitCode, atomic_write_json, read_json


class LegConflict(RuntimeError):
    """Another leg of the same run is still alive: launching this one would put two trainers on one folder."""


class RunIdentityMismatch(Exception):
    """A leg's request does not match the TrainingRun the API server holds (absent, another uid, a foreign path).

    Temporal is not a trust boundary: anyone who reaches it can start a workflow with any input. Nothing is
    created for such a request; the message names the field that did not match.
    """


class PredictFailed(Exception):
    """Predictions could not be made; the message says why (the trainer's own message when it gave one)."""

    def __init__(self, message: str, *, non_retryable: bool) -> None:
        super().__init__(message)
        self.non_retryable = non_retryable


def prepare_predict_work(volume_root: Path, job: PredictJob) -> None:
    """A fresh work folder holding texts.json (a JSON array: texts with newlines stay whole)."""
    work = volume_root / job.work_path
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    atomic_write_json(volume_root / job.texts_file, job.texts)


def remove_predict_work(volume_root: Path, job: PredictJob) -> None:
    shutil.rmtree(volume_root / job.work_path, ignore_errors=True)


def read_predictions(volume_root: Path, job: PredictJob, exit_code: int, fallback_message: str) -> list[Prediction]:
    """The predictions the trainer wrote (validated: one per text, in order), or PredictFailed with its reason.

    Exit 65 (invalid input: no model there, a corrupt checkpoint) is final; other failures may be retried.
    """
    path = volume_root / job.output_file
    unreadable = f"{job.output_file}: no predictions in it"
    try:
        document: Any = read_json(path)
    except (OSError, ValueError) as exc:
        document = None
        unreadable = f"{job.output_file}: unreadable ({exc})"
    if exit_code != ExitCode.COMPLETE:
        error = document.get("error") if isinstance(document, dict) else None
        message = error if isinstance(error, str) and error else fallback_message or "no message"
        raise PredictFailed(
            f"trainer predict exited {exit_code}: {message}", non_retryable=exit_code == ExitCode.INVALID_INPUT
        )
    if document is None:
        raise PredictFailed(f"trainer predict exited 0 but {unreadable}", non_retryable=True)
    items = document.get("predictions") if isinstance(document, dict) else None
    if not isinstance(items, list) or len(items) != len(job.texts):
        count = len(items) if isinstance(items, list) else "no"
        message = f"{job.output_file}: {count} predictions for {len(job.texts)} texts"
        raise PredictFailed(message, non_retryable=True)
    predictions = []
    for index, (text, item) in enumerate(zip(job.texts, items, strict=True)):
        try:
            if item["text"] != text:
                raise ValueError(f"text {item['text']!r} where {text!r} was sent")
            scores = [float(p) for p in item["probabilities"]]
            label = item["label"]
            if not isinstance(label, int) or not 0 <= label < len(scores):
                raise ValueError(f"label {label!r} outside the {len(scores)} scores")
        except (KeyError, TypeError, ValueError) as exc:
            raise PredictFailed(f"{job.output_file}: prediction {index}: {exc}", non_retryable=True) from None
        predictions.append(Prediction(text=text, label=label, scores=scores))
    return predictions


class Backend(Protocol):
    """Where legs run. Every method is idempotent, so a retried activity or restarted worker is safe."""

    async def launch(self, leg: LegSpec) -> LegHandle:
        """Start the leg, or adopt it if it already runs (same run, same leg number). Never starts a second
        one, and refuses (raises) while a different leg of the same run is still alive."""
        ...

    async def observe(self, leg: LegSpec) -> LegObservation:
        """The leg's state now."""
        ...

    async def wait_for_change(self, leg: LegSpec, timeout_s: float) -> LegObservation:
        """Block until the leg's state may have changed (a watch event, a process exit) or timeout_s passes."""
        ...

    async def stop(self, leg: LegSpec, grace_s: float) -> LegObservation:
        """SIGTERM (delete the pod), then SIGKILL after grace_s; returns the final observation."""
        ...

    async def cleanup(self, namespace: str, name: str) -> None:
        """Remove every leg object of a run (processes, Jobs); checkpoints on the volume stay."""
        ...

    async def predict(self, job: PredictJob) -> list[Prediction]:
        """Run `python -m trainer predict` for the job (adopting a run of the same request_id), wait for it,
        return its validated predictions; raise PredictFailed. Nothing of the run is left behind (process, Job,
        work folder), also when cancelled or timed out."""
        ...


@runtime_checkable
class OwnerVerifying(Protocol):
    """A backend whose runs are objects with an owner (Kubernetes: the TrainingRun and its uid).

    The activities ask it before writing anything for a run, so a workflow started by anyone else (issue 11)
    makes no snapshot, config or folder move. A local backend has no such objects and does not implement it.
    """

    async def verify_owner(self, namespace: str, name: str, owner_uid: str | None) -> None:
        """Raise RunIdentityMismatch unless `namespace/name` exists now with uid `owner_uid`."""
        ...
