"""What a leg and a prediction are, and how a leg ended, as data: no I/O, so workflow code may import it.

`LegSpec` names one leg of a run, `LegHandle` what a backend launched, `LegObservation`/`LegTermination` the
facts a backend saw, and `classify_termination` the one rule set that turns those facts into a verdict
(completed / preempted / failed / invalid / stuck) for both backends. `PredictJob` and `Prediction` are one
batch of predictions and its answers. Paths are relative to the volume root (posix); each backend maps them
onto its own mount. The backends' interface and their shared file handling live in `controller.backends.base`.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, Field

from controller.spec import TrainingRunSpec
from trainer.volume.exitcodes import ExitCode


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

    def trainer_args(self, root: str) -> list[str]:
        """`python -m trainer` arguments, with the volume mounted at `root`; the leg number is the trainer's
        generation, which fences it once a newer leg is launched (trainer.volume.fencing)."""
        return [
            "train",
            "--run-dir",
            f"{root}/{self.run_path}",
            "--snapshot",
            f"{root}/{self.snapshot_path}",
            "--config",
            f"{root}/{self.config_path}",
            "--generation",
            str(self.leg),
            *self.data_parallel_args(),
        ]

    def data_parallel_args(self) -> list[str]:
        """`--processes N` (per node) for a data-parallel leg (the trainer runs its ranks through torchrun), with
        `--nnodes M` for a multi-node one (the Kubernetes backend adds its rendezvous endpoint), else nothing."""
        resources = self.spec.resources
        if resources.world_size == 1:
            return []
        nodes = ["--nnodes", str(resources.nodes)] if resources.nodes > 1 else []
        uneven = ["--allow-uneven-accumulation"] if resources.allow_uneven_accumulation else []
        return ["--processes", str(resources.processes_per_node), *nodes, *uneven]


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
    SUPERSEDED = "superseded"  # fenced: a newer leg owns the run folder; not the run's failure, no budget used


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
    if termination.exit_code == ExitCode.FENCED:
        # "fenced: leg 7 superseded by leg 8": a newer leg was launched for the run (a lost node's leg carried
        # on). That leg is the run's; this one committed nothing after it and counts against no budget.
        return LegOutcomeKind.SUPERSEDED
    if termination.disrupted:
        return LegOutcomeKind.PREEMPTED
    if termination.reason == "OOMKilled":
        # The container outgrew its own memory limit (the kernel's cgroup OOM killer, exit 137): the next leg with the
        # same limit dies the same way, so it counts against maxFailures with backoff instead of resuming for free
        # until maxPreemptions runs out. A node under memory pressure evicts instead (status.reason Evicted: disrupted).
        return LegOutcomeKind.FAILED
    if termination.signal in _EXTERNAL_KILL_SIGNALS or termination.exit_code in (128 + 9, 128 + 15):
        # Killed from outside without the trainer's own word (SIGKILL, lost process, OOM kill by the
        # node): the work since the last checkpoint is lost but the run is not at fault.
        return LegOutcomeKind.PREEMPTED
    return LegOutcomeKind.FAILED


class Prediction(BaseModel):
    text: str
    label: int
    scores: list[float] = Field(default_factory=list)


class PredictJob(BaseModel):
    """One batch of predictions for a backend to run; the same request_id always names the same Job/folder."""

    namespace: str
    name: str  # the run the predictions belong to (its image, resources and scheduling on Kubernetes)
    request_id: str = Field(pattern=r"^[0-9a-f]{8}$")
    model_path: str  # the model folder
    read_paths: list[str]  # every folder the trainer reads: the model, and a checkpoint's run tokenizer/
    work_path: str  # "runs/<ns>/<name>/predictions/<request_id>": texts.json in, predictions.json out
    texts: list[str] = Field(min_length=1)
    timeout_s: float = Field(gt=0)

    @property
    def texts_file(self) -> str:
        return f"{self.work_path}/texts.json"

    @property
    def output_file(self) -> str:
        return f"{self.work_path}/predictions.json"

    def trainer_args(self, root: str) -> list[str]:
        """`python -m trainer` arguments, with the volume mounted at `root`."""
        return [
            "predict",
            "--model",
            f"{root}/{self.model_path}",
            "--file",
            f"{root}/{self.texts_file}",
            "--output",
            f"{root}/{self.output_file}",
        ]
