"""The TrainingRun document: pydantic models of its spec and status, the single source of truth.

`relay validate`, `relay run`, the operator and the generated CRD schema (`controller/crd.py`) all
derive from these models. Wire format is camelCase, as Kubernetes users expect; unknown fields are
errors (the CRD prunes them silently on 1.20, so `relay validate` is the strict gate).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, model_validator

from controller.status import Condition, RunStatus
from trainer.config import CamelModel, TrainerConfig, TrainingSettings

API_GROUP = "relay.dev"
API_VERSION = "v1alpha1"
KIND = "TrainingRun"
PLURAL = "trainingruns"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Room for "-leg-NNNN" (Job names) and "trainingrun-<ns>." (workflow ids) stays within limits.
MAX_RUN_NAME = 40
DEFAULT_TRAINER_IMAGE = "ghcr.io/relay-ml/relay-trainer:0.1.0"


def _dns_label(value: str) -> str:
    if len(value) > 63:  # said first: a long name is told it is too long, not that it is no DNS label
        raise ValueError(f"is too long: {len(value)} characters, at most 63 (a DNS label)")
    if not _DNS_LABEL.match(value):
        raise ValueError("must be a DNS label: lowercase letters, digits and '-', starting and ending alphanumeric")
    return value


def _volume_relative_path(value: str) -> str:
    path = PurePosixPath(value)
    if path.is_absolute() or value.startswith("~"):
        raise ValueError("must be a path relative to the volume root, not absolute")
    if ".." in path.parts:
        raise ValueError("must not contain '..' (paths stay inside the volume)")
    if not value.strip() or value in (".", "./"):
        raise ValueError("must name a file or folder inside the volume")
    if not re.match(VOLUME_PATH_PATTERN, value):  # the CRD's pattern: the API server refuses the same paths
        raise ValueError("must be a plain relative path: no empty ('//') segments, no leading space or './.'")
    return value


def _run_name(value: str) -> str:
    if len(value) > MAX_RUN_NAME:  # before the DNS-label rule, so a 300-character name is told "too long"
        raise ValueError(
            f"is too long: {len(value)} characters, must be at most {MAX_RUN_NAME}"
            " (Job and workflow names derive from it)"
        )
    return _dns_label(value)


def _model_reference(value: str) -> str:
    try:  # hub ids ("bert-base-uncased", "org/name") are relative paths too; ".." or "~" never is a model
        return _volume_relative_path(value)
    except ValueError as exc:
        raise ValueError(f"must be 'tiny', a hub id or a path inside the volume: {exc}") from None


def _quantity_bytes(value: str) -> float:
    number = re.match(r"^[0-9]+(\.[0-9]+)?", value)
    assert number is not None  # the field's pattern ran first
    return float(number.group()) * _MEMORY_UNITS[value[number.end() :]]


def _bounded_memory(value: str) -> str:
    if _quantity_bytes(value) > MAX_MEMORY_BYTES:
        raise ValueError(f"{value!r} is more than {MAX_MEMORY} (the most one leg may ask for)")
    return value


def _bounded_cpu(value: str) -> str:
    cores = float(value[:-1]) / 1000 if value.endswith("m") else float(value)
    if cores > MAX_CPU_CORES:
        raise ValueError(f"{value!r} is more than {MAX_CPU_CORES} cores (the trainer pins at most that many threads)")
    return value


# Bounds the CRD schema states too (maxLength, pattern, maximum), so the API server refuses what `relay validate`
# refuses. What a structural schema cannot state on 1.20 (a quantity's value, a name's length: metadata has no
# schema) the controller refuses at creation with a Failed condition naming the field, from these same models.
MAX_PATH = 1024  # characters of a path on the volume
MAX_TEXT = 253  # characters of a name-like string (a DNS subdomain's limit)
MAX_CPU_CORES = 512  # trainer/config.py's torch_threads bound: more failed at run time with a pydantic dump
MAX_MEMORY = "4Ti"  # the largest cloud GPU nodes have 2 TiB of memory
_MEMORY_UNITS = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
MAX_MEMORY_BYTES = 4 * 2**40
# A relative path with no ".." segment, not starting with '/' or '~'. RE2 (the API server's regex engine) has no
# look-ahead, so "a segment that is not '..'" is spelled out; 'tiny' and hub ids ("org/name") match it too.
_SEGMENT = r"([^./][^/]*|\.[^./][^/]*|\.\.[^/]+|\.)"
_FIRST_SEGMENT = r"([^./~\s][^/]*|\.[^./][^/]*|\.\.[^/]+)"
VOLUME_PATH_PATTERN = rf"^(\./)?{_FIRST_SEGMENT}(/{_SEGMENT})*/?$"

DnsLabel = Annotated[str, AfterValidator(_dns_label)]
VolumePath = Annotated[
    str,
    AfterValidator(_volume_relative_path),
    Field(json_schema_extra={"pattern": VOLUME_PATH_PATTERN, "maxLength": MAX_PATH}),
]
ModelReference = Annotated[
    str,
    AfterValidator(_model_reference),
    Field(json_schema_extra={"pattern": VOLUME_PATH_PATTERN, "maxLength": MAX_PATH}),
]
Quantity = Annotated[
    str,
    Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$", json_schema_extra={"maxLength": 15}),
    AfterValidator(_bounded_memory),
]
CpuQuantity = Annotated[
    str,
    Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$", json_schema_extra={"maxLength": 10}),
    AfterValidator(_bounded_cpu),
]


class Metadata(CamelModel):
    """The subset of Kubernetes object metadata Relay reads; other keys (labels, uid, ...) pass through."""

    model_config = ConfigDict(extra="allow")  # merged with CamelModel's config
    name: Annotated[str, AfterValidator(_run_name)]
    namespace: DnsLabel = "default"


class DatasetSpec(CamelModel):
    """Where the training data comes from; it is snapshotted once, content-addressed."""

    source: Literal["demo", "csv", "jsonl", "parquet", "hub"] = Field(
        description="demo: built-in offline movie-review sentiment data; csv/jsonl/parquet: a file on the volume; "
        "hub: a Hugging Face dataset name (needs network)."
    )
    path: VolumePath | None = Field(None, description="File for csv/jsonl/parquet, relative to the volume root.")
    name: str | None = Field(None, min_length=1, max_length=MAX_TEXT, description="Hub dataset id, for source=hub.")
    config_name: str | None = Field(
        None, min_length=1, max_length=MAX_TEXT, description="Hub dataset configuration, for source=hub."
    )
    split: str = Field("train", min_length=1, max_length=MAX_TEXT, description="Hub split to read, for source=hub.")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="Share of rows held out for evaluation.")
    split_seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the fixed train/eval split.")
    max_rows: int | None = Field(None, ge=2, le=10**12, description="Use at most this many rows (before splitting).")
    text_field: str = Field("text", min_length=1, max_length=MAX_TEXT, description="Column holding the input text.")
    label_field: str = Field("label", min_length=1, max_length=MAX_TEXT, description="Column holding integer labels.")

    @model_validator(mode="after")
    def _source_needs(self) -> DatasetSpec:
        if self.source in ("csv", "jsonl", "parquet") and self.path is None:
            raise ValueError(f"path is required when source is {self.source!r}")
        if self.source == "hub" and self.name is None:
            raise ValueError("name is required when source is 'hub'")
        return self


class ResourcesSpec(CamelModel):
    """What one leg's pod asks for."""

    gpus: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per leg.")
    cpu: CpuQuantity = Field(
        "2", description=f"CPU request (at most {MAX_CPU_CORES} cores); also sets the pinned torch thread count."
    )
    memory: Quantity = Field("8Gi", description=f"Memory request and limit, at most {MAX_MEMORY}.")
    processes: int | None = Field(
        None,
        ge=1,
        le=64,
        description=(
            "Data-parallel processes per leg, run through torchrun (gloo on CPU, NCCL on GPUs); default: gpus "
            "when gpus > 1, else 1; on each of `nodes` pods. Global batch = batchSize x gradientAccumulationSteps x "
            "nodes x processes."
        ),
    )
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Nodes per leg (Kubernetes only): a leg with nodes > 1 is one Indexed Job of `nodes` pods, each running "
            "the per-node processes, joined by c10d rendezvous on index 0 through a headless Service (needs "
            "Kubernetes 1.24+). World size = nodes x processes per node; global batch = batchSize x "
            "gradientAccumulationSteps x world size."
        ),
    )
    allow_uneven_accumulation: bool = Field(
        False,
        description=(
            "Let a run resume on a process count that does not divide its global batch: ranks then accumulate "
            "unequal shares (the global batch and the sample order are still kept)."
        ),
    )

    @model_validator(mode="after")
    def _one_process_per_gpu(self) -> ResourcesSpec:
        if self.gpus and self.processes is not None and self.processes != self.gpus:
            raise ValueError(f"processes: {self.processes} differs from gpus {self.gpus} (one process per GPU)")
        return self

    @property
    def processes_per_node(self) -> int:
        """The data-parallel processes of one of the leg's pods: processes, else the GPU count, else 1."""
        return self.processes if self.processes is not None else max(self.gpus, 1)

    @property
    def world_size(self) -> int:
        """The leg's data-parallel ranks: nodes x processes per node."""
        return self.nodes * self.processes_per_node


class Toleration(CamelModel):
    key: str | None = Field(None, min_length=1, max_length=317)  # a label key: 253-character prefix, '/', 63
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(None, max_length=63)  # a label value
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0, le=31_536_000)  # a year


class SchedulingProfile(CamelModel):
    """Where legs may run."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    priority_class_name: str | None = Field(None, min_length=1, max_length=MAX_TEXT)


class SchedulingSpec(SchedulingProfile):
    kueue_queue: str | None = Field(
        None, min_length=1, max_length=63, description="Passed through as the kueue.x-k8s.io/queue-name label."
    )
    fallback: SchedulingProfile | None = Field(None, description="Profile used after fallbackAfterPreemptions.")
    fallback_after_preemptions: int | None = Field(None, ge=1, le=10_000)


class StorageSpec(CamelModel):
    claim_name: DnsLabel = Field("relay-shared", description="ReadWriteMany PVC holding snapshots and runs.")


class RetrySpec(CamelModel):
    """Budgets: preemptions (infrastructure) and failures (the run's own) are counted apart."""

    max_preemptions: int = Field(50, ge=0, le=10_000)
    max_failures: int = Field(3, ge=0, le=1000)
    backoff_seconds: float = Field(10.0, ge=0, le=3600, description="First backoff after a failure; doubles.")
    max_backoff_seconds: float = Field(600.0, ge=0, le=86_400)
    stuck_after_seconds: float = Field(
        900.0, gt=0, le=604_800, description="Unschedulable/image-pull failing this long (at most a week): stuck."
    )
    rendezvous_timeout_seconds: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description=(
            "A multi-node leg (resources.nodes > 1) whose pods are not all running this long after the first one "
            "started never completes its rendezvous: stuck (RendezvousTimeout), its Job deleted."
        ),
    )
    node_lost_after_seconds: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="The leg's node NotReady or Unknown this long: the leg is lost (preempted, reason NodeLost).",
    )
    progress_stall_seconds: float = Field(
        600.0,
        gt=0,
        le=604_800,
        description="A running leg whose progress.json has not advanced this long: preempted (ProgressStalled).",
    )


class TrainingRunSpec(CamelModel):
    model: ModelReference = Field(
        "tiny", min_length=1, description="'tiny', a hub id, or a path relative to the volume root (no '..')."
    )
    dataset: DatasetSpec
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    image: str = Field(DEFAULT_TRAINER_IMAGE, min_length=1, max_length=512)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    retries: RetrySpec = Field(default_factory=RetrySpec)
    termination_grace_period_seconds: int = Field(60, ge=5, le=3600)
    suspend: bool = Field(False, description="true pauses the run (current leg checkpoints and stops).")


class TrainingRun(CamelModel):
    """A whole TrainingRun document as applied with kubectl or passed to `relay run`."""

    model_config = ConfigDict(extra="allow")  # merged with CamelModel's; status, kubectl annotations
    api_version: Literal["relay.dev/v1alpha1"]
    kind: Literal["TrainingRun"]
    metadata: Metadata
    spec: TrainingRunSpec

    @property
    def workflow_id(self) -> str:
        return workflow_id(self.metadata.namespace, self.metadata.name)


# VolumeReady is set only by the operator: False while the run's claim is not Bound, absent once it is.
class ResourceCondition(Condition):
    """A condition of the TrainingRun object: the run's own, or VolumeReady."""

    type: Literal["Ready", "Succeeded", "Failed", "Suspended", "VolumeReady"]  # type: ignore[assignment]


# Here, not in the operator: the CRD generator (`controller.crd`) derives the status schema from it and
# never imports the operator (`controller.kubernetes`).
class CustomResourceStatus(RunStatus):
    """`.status` of a TrainingRun: RunStatus plus fields only `kubectl get` needs."""

    conditions: list[ResourceCondition] = Field(default_factory=list)  # type: ignore[assignment]
    progress_text: str = Field("0%", description="progress as a percentage, for kubectl get.")
    leg_count: int = Field(0, ge=0, description="Legs started so far (status.legs keeps only the newest).")

    @classmethod
    def from_run_status(cls, status: RunStatus) -> CustomResourceStatus:
        trimmed = status.for_custom_resource()
        numbers = [leg.leg for leg in status.legs]
        if status.current_leg is not None:
            numbers.append(status.current_leg)
        return cls(
            **trimmed.model_dump(),
            progress_text=f"{status.progress * 100:.0f}%",
            leg_count=max(numbers) + 1 if numbers else 0,
        )


def cpu_threads(cpu: str) -> int:
    """Pinned torch thread count for a CPU request: whole cores, at least one ("500m" -> 1, "4" -> 4)."""
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return max(1, int(cores))


def volume_model(model: str, volume_root: Path) -> str | None:
    """The folder of a model stored on the volume, relative to its root ("runs/ml/base/final"), or None.

    spec.model names a volume folder when it has a '/' and that folder exists; otherwise it is 'tiny' or a hub
    id ("org/name" that is not on the volume). Validation already keeps it relative and free of '..'.
    """
    if model == "tiny" or "/" not in model:
        return None
    relative = PurePosixPath(model).as_posix()
    return relative if (volume_root / relative).is_dir() else None


def trainer_config(spec: TrainingRunSpec, model: str | None = None) -> TrainerConfig:
    """The config every leg of this run trains with; `model` overrides spec.model once resolved to a path."""
    return TrainerConfig(
        **spec.training.model_dump(),
        model=model or spec.model,
        text_field=spec.dataset.text_field,
        label_field=spec.dataset.label_field,
        torch_threads=cpu_threads(spec.resources.cpu),
    )


# Temporal takes any UTF-8 string up to 1000 bytes as a workflow id (the server's default
# limit.maxIDLength). Namespaces and run names are DNS labels, which never contain '.', so
# "trainingrun-<ns>.<name>" splits back into one (ns, name) only: `team/a-x` and `team-a/x` no longer
# share an id. '.' rather than '/' keeps the id one path segment in the Web UI's URLs.
WORKFLOW_ID_PREFIX = "trainingrun-"


def workflow_id(namespace: str, name: str) -> str:
    """The training workflow's id for TrainingRun `namespace/name`: one run, one id, and back."""
    return f"{WORKFLOW_ID_PREFIX}{namespace}.{name}"


def legacy_workflow_id(namespace: str, name: str) -> str:
    """The id controllers before issue 11 used ("trainingrun-<ns>-<name>"; `team/a-x` = `team-a/x`).

    Only ever looked up, never started: a run begun under it is adopted when its input's namespace, name
    and owner uid are this object's (`controller.run_workflows`), otherwise left alone.
    """
    return f"{WORKFLOW_ID_PREFIX}{namespace}-{name}"


_Document = TypeVar("_Document", bound=CamelModel)


class InvalidDocument(ValueError):
    """A document that cannot run; `errors` lists (field path, message) pairs. Subclasses name the kind."""

    kind = "document"

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {field}: {message}" for field, message in errors)
        super().__init__(f"{source}: invalid {self.kind}\n{lines}")


class InvalidTrainingRun(InvalidDocument):
    """A TrainingRun document that cannot run."""

    kind = KIND


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-after")]
    return ".".join(parts) or "(document)"


def field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """A pydantic error as (field path, message) pairs, the form every "invalid <kind>" message lists."""
    return [
        (_field_path(err["loc"]), err["msg"].removeprefix("Value error, ")) for err in exc.errors(include_url=False)
    ]


def parse_document(model: type[_Document], invalid: type[InvalidDocument], document: Any, source: str) -> _Document:
    """Validate a parsed document as `model`; raise `invalid` naming every bad field."""
    if not isinstance(document, dict):
        raise invalid(source, [("(document)", "must be a mapping with apiVersion, kind, metadata, spec")])
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise invalid(source, field_errors(exc)) from None


def read_document(path: str, invalid: type[InvalidDocument]) -> Any:
    """A YAML/JSON file's parsed content; an unreadable or unparsable file raises `invalid` naming the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except OSError as exc:
        raise invalid(path, [("(file)", exc.strerror or str(exc))]) from None
    except yaml.YAMLError as exc:
        raise invalid(path, [("(file)", f"not valid YAML: {exc}")]) from None


def parse_training_run(document: Any, source: str = "<document>") -> TrainingRun:
    """Validate a parsed document; raise InvalidTrainingRun naming every bad field."""
    return parse_document(TrainingRun, InvalidTrainingRun, document, source)


def load_training_run(path: str) -> TrainingRun:
    """Read and validate a TrainingRun YAML/JSON file."""
    return parse_training_run(read_document(path, InvalidTrainingRun), path)
