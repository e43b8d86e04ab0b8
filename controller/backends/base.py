"""The backend interface: launch, observe, stop one training leg; and the pure classification of how it ended.

A leg is one trainer process (`python -m trainer train --run-dir ... --snapshot ... --config ...`)
running somewhere: a child process (LocalBackend) or a Kubernetes Job (KubernetesBackend). Backends
report *what happened* as a LegTermination; `classify_termination` alone decides *what it means*
(completed / preempted / failed / invalid / stuck), so both backends are judged by the same rules.

Paths in these models are relative to the volume root (posix); each backend maps them onto its own
mount (a local folder, or the PVC's mountPath inside the pod).
"""

from __future__ import annotations

import enum
from typing import Protocol

from pydantic import BaseModel, Field

from controller.spec import TrainingRunSpec
from trainer.volume import ExitCode


class LegSpec(BaseModel):
    """Everything a backend needs to start leg `leg` of a run; the same spec always names the same leg."""

    namespace: str
    name: str
    leg: int = Field(ge=0)
    run_path: str  # "runs/<ns>/<name>", relative to the volume root
    snapshot_path: str  # "snapshots/<sha256>"
    spec: TrainingRunSpec
    use_fallback_profile: bool = False
    owner_uid: str | None = None  # the TrainingRun's uid, for owner references on Kubernetes
    extra_env: dict[str, str] = Field(default_factory=dict)

    @property
    def config_path(self) -> str:
        return f"{self.run_path}/config.json"


class LegHandle(BaseModel):
    """What launch() returns: which leg runs, under what backend identity, and whether it was adopted."""

    leg: int
    backend_id: str  # Job name, or "pid:<pid>" for a local process
    started_at: float
    adopted: bool = False


class LegState(enum.StrEnum):
    PENDING = "Pending"  # accepted, not yet running (scheduling, pulling the image)
    RUNNING = "Running"
    TERMINATED = "Terminated"  # ended; see LegTermination
    MISSING = "Missing"  # no such leg exists (never launched, or its record is gone)


class LegTermination(BaseModel):
    """How a leg ended, as the backend saw it; the facts, no judgement."""

    exit_code: int | None = None  # the trainer's own code, when it exited by itself
    signal: int | None = None  # terminating signal, when it was killed
    reason: str = ""  # e.g. "Evicted", "Deleted", "NodeLost", "OOMKilled", "DisruptionTarget", "Unschedulable"
    message: str = ""
    disrupted: bool = False  # the infrastructure took it away (eviction, deletion, node loss, DisruptionTarget)
    stuck: bool = False  # never started within the deadline (unschedulable, image pull failing)


class LegObservation(BaseModel):
    state: LegState
    termination: LegTermination | None = None
    detail: str = ""  # a short human-readable line (pod phase, waiting reason)


# SIGHUP, SIGINT, SIGKILL, SIGTERM: sent from outside. SIGSEGV, SIGABRT etc. are the trainer's own failure.
_EXTERNAL_KILL_SIGNALS = frozenset({1, 2, 9, 15})


class LegOutcomeKind(enum.StrEnum):
    COMPLETED = "completed"
    PREEMPTED = "preempted"  # infrastructure loss: resume from the checkpoint, counts against maxPreemptions
    FAILED = "failed"  # the trainer's own error: counts against maxFailures, with backoff
    INVALID = "invalid"  # bad input: stop the run, do not retry
    STUCK = "stuck"  # could not start: counts as a failure, reported as such


def classify_termination(termination: LegTermination) -> LegOutcomeKind:
    """Decide what a leg's end means. Order matters: the trainer's own codes are the most specific."""
    if termination.stuck:
        return LegOutcomeKind.STUCK
    if termination.exit_code == ExitCode.COMPLETE:
        return LegOutcomeKind.COMPLETED
    if termination.exit_code == ExitCode.INVALID_INPUT:
        return LegOutcomeKind.INVALID
    if termination.exit_code == ExitCode.PREEMPTED:
        return LegOutcomeKind.PREEMPTED
    if termination.disrupted:
        return LegOutcomeKind.PREEMPTED
    if termination.signal in _EXTERNAL_KILL_SIGNALS or termination.exit_code in (128 + 9, 128 + 15):
        # Killed from outside without the trainer's own word (SIGKILL, lost process, OOM kill by the
        # node): the work since the last checkpoint is lost but the run is not at fault.
        return LegOutcomeKind.PREEMPTED
    return LegOutcomeKind.FAILED


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
