"""Build the batch/v1 Jobs Relay runs: pure functions from a LegSpec or PredictJob to a manifest dict.

No API calls here, so they are unit-tested without a cluster. One Job per leg, named `<run>-leg-<n>`;
the workflow, not the Job controller, decides about the next leg (`backoffLimit: 0`, `restartPolicy:
Never`). The claim is mounted by parts: the run's own folder read-write, the dataset snapshot read-only,
and a model stored on the volume (`spec.model`, found there by `controller.spec.volume_model`) read-only,
each at the same path under /relay-volume that the trainer's command line and config.json name. On servers that have
it (1.26+, `controller.kubernetes.server`) a Job also carries `POD_FAILURE_POLICY`.

A multi-node leg (`resources.nodes` M > 1, issue 14) is ONE Indexed Job (`completionMode: Indexed`, completions =
parallelism = M, backoffLimit 0: losing any pod fails the whole Job) and a headless Service `rdzv-<job>` owned by
that Job. The pods' subdomain is the Service, so Kubernetes names pod i `<job>-i.rdzv-<job>`, and every pod's
torchrun meets at index 0's c10d rendezvous (`--rdzv-endpoint <job>-0.rdzv-<job>:29400`). Indexed Jobs need 1.24+
(`controller.kubernetes.server`); the backend refuses a multi-node run on an older server. Kueue: the TrainingRun's
`kueue.x-k8s.io/queue-name` and `kueue.x-k8s.io/priority-class` labels (or spec.scheduling.kueueQueue) go onto the
Job, and a queued multi-node Job is created suspended, as Kueue's batch/Job integration documents, so Kueue admits
the gang as one Workload and unsuspends it.

A predict Job (`<run>-predict-<request id>`) runs `python -m trainer predict` once, with the run's image,
resources (one GPU if the run had any) and scheduling; it mounts the model's folders read-only and the
request's work folder read-write, the same way.
"""

from __future__ import annotations

from typing import Any

from controller.leg_model import LegSpec, PredictJob
from controller.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    SchedulingProfile,
    TrainingRunSpec,
    cpu_threads,
    workflow_id,
)
from trainer.volume import TERMINATION_LOG_ENV, ExitCode

VOLUME_MOUNT = "/relay-volume"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # the Kubernetes default, named so the trainer finds it
VOLUME_NAME = "relay-volume"
TRAINER_CONTAINER = "trainer"
MANAGED_BY = "relay-controller"
LABEL_RUN = "relay.dev/run"
LABEL_LEG = "relay.dev/leg"
# Predict Jobs carry this instead of LABEL_RUN: a run's leg bookkeeping and cleanup never see them.
LABEL_PREDICT_RUN = "relay.dev/predict-run"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # a Kueue WorkloadPriorityClass
# The labels of a TrainingRun copied onto its leg Jobs, for Kueue.
KUEUE_LABELS = (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL)
RENDEZVOUS_PORT = 29400  # torchrun's c10d default
ANNOTATION_WORKFLOW = "relay.dev/workflow-id"
# Written by the backend onto a leg's Job once the leg has ended: the LegTermination as JSON.
ANNOTATION_TERMINATION = "relay.dev/termination"
NON_ROOT_UID = 1000
MAX_NAME = 63

# Selects every Job and pod Relay made (the backend's watches use it).
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
# Our Jobs run one pod once (backoffLimit 0), so any failure already fails the Job; these rules add what a
# user reading `kubectl describe job` needs: the Job's Failed condition gets reason PodFailurePolicy and a
# message naming the rule (a pod taken away by an eviction, preemption or node drain; a trainer that
# checkpointed and stopped, exit 75) instead of a bare BackoffLimitExceeded. FailJob, not Ignore: Ignore
# would have the Job controller start a second pod of the same leg, while the workflow starts the next leg.
POD_FAILURE_POLICY: dict[str, Any] = {
    "rules": [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": TRAINER_CONTAINER,
                "operator": "In",
                "values": [int(ExitCode.PREEMPTED)],
            },
        },
    ]
}


def job_name(run_name: str, leg: int) -> str:
    """`<run>-leg-<n>`; spec.py caps run names at 40 characters, so this always fits a DNS label."""
    name = f"{run_name}-leg-{leg}"
    if len(name) > MAX_NAME:
        raise ValueError(f"metadata.name: {run_name!r} is too long for Job names ({name!r} > {MAX_NAME} characters)")
    return name


def rendezvous_service_name(job: str) -> str:
    """`rdzv-<job>`: the headless Service of a multi-node leg (a Service name must start with a letter)."""
    name = f"rdzv-{job}"
    if len(name) > MAX_NAME:
        raise ValueError(f"metadata.name: Job {job!r} is too long for its rendezvous Service ({name!r})")
    return name


def rendezvous_endpoint(job: str) -> str:
    """Index 0's pod through the headless Service: `<job>-0.rdzv-<job>:29400`."""
    return f"{job}-0.{rendezvous_service_name(job)}:{RENDEZVOUS_PORT}"


def leg_labels(leg: LegSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "relay-trainer",
        "app.kubernetes.io/instance": leg.name,
        "app.kubernetes.io/component": "training-leg",
        "app.kubernetes.io/part-of": "relay",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_RUN: leg.name,
        LABEL_LEG: str(leg.leg),
    }


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def trainer_command(leg: LegSpec) -> list[str]:
    """The leg's command; a multi-node leg's names its rendezvous (each pod's index comes from the Indexed Job)."""
    command = ["python", "-m", "trainer", *leg.trainer_args(VOLUME_MOUNT)]
    if leg.spec.resources.nodes > 1:
        command += ["--rdzv-endpoint", rendezvous_endpoint(job_name(leg.name, leg.leg))]
    return command


def _resources(spec: TrainingRunSpec, gpus: int) -> dict[str, dict[str, str]]:
    requests: dict[str, str] = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    limits: dict[str, str] = {"memory": spec.resources.memory}
    if gpus > 0:
        requests["nvidia.com/gpu"] = str(gpus)
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, "limits": limits}


def _claim_mount(path: str, *, read_only: bool) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": VOLUME_NAME, "mountPath": f"{VOLUME_MOUNT}/{path}", "subPath": path}
    if read_only:
        mount["readOnly"] = True
    return mount


def _pod_spec(
    spec: TrainingRunSpec,
    profile: SchedulingProfile,
    *,
    command: list[str],
    env: dict[str, str],
    resources: dict[str, dict[str, str]],
    claim_mounts: list[dict[str, Any]],
    grace_s: int,
) -> dict[str, Any]:
    """A non-root, read-only-root pod running the trainer image once, with the claim and scratch folders."""
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace_s,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": NON_ROOT_UID,
            "fsGroup": NON_ROOT_UID,
            # Without it the kubelet chowns every file of the claim at each pod start (the whole volume:
            # every run's checkpoints), on drivers that apply fsGroup; the root folder tells it all is done.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "image": spec.image,
                "imagePullPolicy": "IfNotPresent",
                "command": command,
                # The trainer writes why it failed to the termination message; a real kubelet falls back to
                # the log's tail when it wrote none (a crash before it could).
                "env": [
                    {"name": key, "value": value}
                    for key, value in sorted({TERMINATION_LOG_ENV: TERMINATION_MESSAGE_PATH, **env}.items())
                ],
                "terminationMessagePath": TERMINATION_MESSAGE_PATH,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "resources": resources,
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "privileged": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    *claim_mounts,
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            {"name": VOLUME_NAME, "persistentVolumeClaim": {"claimName": spec.storage.claim_name}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if profile.node_selector:
        pod_spec["nodeSelector"] = dict(profile.node_selector)
    if profile.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in profile.tolerations]
    if profile.priority_class_name:
        pod_spec["priorityClassName"] = profile.priority_class_name
    return pod_spec


def _trainer_env(spec: TrainingRunSpec, namespace: str, name: str) -> dict[str, str]:
    """What every trainer container gets: unbuffered output, a writable HOME, threads for its CPUs, its run."""
    return {
        "PYTHONUNBUFFERED": "1",
        "HOME": "/tmp",
        "OMP_NUM_THREADS": str(cpu_threads(spec.resources.cpu)),
        "RELAY_RUN_NAMESPACE": namespace,
        "RELAY_RUN_NAME": name,
    }


def _one_try_job(
    name: str,
    namespace: str,
    pod_labels: dict[str, str],
    spec: TrainingRunSpec,
    pod_spec: dict[str, Any],
    *,
    owner: tuple[str, str | None],
    pod_failure_policy: bool,
    kueue_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Job that runs its pod once (no retry: the workflow decides what comes next), queued by kueue when asked
    (`kueue_labels`: the TrainingRun's own, spec.scheduling.kueueQueue first), owned by its TrainingRun when its
    uid is known, with POD_FAILURE_POLICY when the server has it (1.26+)."""
    job_labels = dict(pod_labels)
    job_labels |= {key: value for key, value in (kueue_labels or {}).items() if key in KUEUE_LABELS}
    if spec.scheduling.kueue_queue:
        job_labels[KUEUE_QUEUE_LABEL] = spec.scheduling.kueue_queue
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": job_labels}
    owner_name, owner_uid = owner
    if owner_uid:
        metadata["ownerReferences"] = [owner_reference(owner_name, owner_uid)]
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "completions": 1,
        "parallelism": 1,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    if pod_failure_policy:
        job_spec["podFailurePolicy"] = POD_FAILURE_POLICY
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def build_leg_job(
    leg: LegSpec,
    *,
    pod_failure_policy: bool = False,
    model_path: str | None = None,
    kueue_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The Job manifest of `leg`; the same LegSpec (and server) always gives the same manifest.

    `model_path`: the model's folder on the volume when spec.model names one (`controller.spec.volume_model`),
    mounted read-only; a subPath that does not exist would be created by the kubelet, so only a found one.
    `kueue_labels`: the TrainingRun's labels (only KUEUE_LABELS are copied). A multi-node leg's Job is Indexed
    (see the module docstring); its Service is `build_rendezvous_service`.
    """
    spec = leg.spec
    name = job_name(leg.name, leg.leg)
    labels = leg_labels(leg)
    profile: SchedulingProfile = spec.scheduling
    if leg.use_fallback_profile and spec.scheduling.fallback is not None:
        profile = spec.scheduling.fallback

    env = {**_trainer_env(spec, leg.namespace, leg.name), "RELAY_LEG": str(leg.leg), **leg.extra_env}
    pod_spec = _pod_spec(
        spec,
        profile,
        command=trainer_command(leg),
        env=env,
        resources=_resources(spec, spec.resources.gpus),
        claim_mounts=[
            _claim_mount(leg.run_path, read_only=False),
            _claim_mount(leg.snapshot_path, read_only=True),
            *([_claim_mount(model_path, read_only=True)] if model_path else []),
        ],
        grace_s=spec.termination_grace_period_seconds,
    )
    owner = (leg.name, leg.owner_uid)
    job = _one_try_job(
        name,
        leg.namespace,
        labels,
        spec,
        pod_spec,
        owner=owner,
        pod_failure_policy=pod_failure_policy,
        kueue_labels=kueue_labels,
    )
    job["metadata"]["annotations"] = {ANNOTATION_WORKFLOW: workflow_id(leg.namespace, leg.name)}
    nodes = spec.resources.nodes
    if nodes > 1:
        job["spec"] |= {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes}
        pod_spec["subdomain"] = rendezvous_service_name(name)
        pod_spec["containers"][0]["ports"] = [{"name": "rdzv", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
        if KUEUE_QUEUE_LABEL in job["metadata"]["labels"]:
            job["spec"]["suspend"] = True  # Kueue admits the whole gang as one Workload, then unsuspends it
    return job


def build_rendezvous_service(job: dict[str, Any]) -> dict[str, Any]:
    """The headless Service of a multi-node leg's Indexed Job `job` (as created: its uid is the Service's owner, so
    the Service goes with the Job). Not-ready addresses are published: the pods resolve each other while starting,
    before any readiness, which is when the rendezvous happens."""
    meta = job["metadata"]
    name = meta["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": rendezvous_service_name(name),
            "namespace": meta["namespace"],
            "labels": {key: value for key, value in meta["labels"].items() if key not in KUEUE_LABELS},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": name,
                    "uid": meta["uid"],
                    "controller": True,  # no blockOwnerDeletion: that needs update on jobs/finalizers
                }
            ],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"job-name": name},  # the Job controller's label on its pods
            "ports": [{"name": "rdzv", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def predict_job_name(run_name: str, request_id: str) -> str:
    """`<run>-predict-<request id>`: at most 40 + 17 characters."""
    return f"{run_name}-predict-{request_id}"


# A predict Job ends by itself this long after the backend's own deadline, should the controller be gone,
# and is removed this long after it ended where the TTL controller runs (1.21+); the backend deletes it first.
PREDICT_DEADLINE_MARGIN_S = 120
PREDICT_TTL_AFTER_FINISHED_S = 600


def build_predict_job(
    job: PredictJob, spec: TrainingRunSpec, owner_uid: str | None = None, *, pod_failure_policy: bool = False
) -> dict[str, Any]:
    """The one-shot Job of a prediction request, with the run's image, resources and primary scheduling profile."""
    name = predict_job_name(job.name, job.request_id)
    labels = {
        "app.kubernetes.io/name": "relay-trainer",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/part-of": "relay",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_PREDICT_RUN: job.name,
    }
    env = {**_trainer_env(spec, job.namespace, job.name), "TOKENIZERS_PARALLELISM": "false"}
    pod_spec = _pod_spec(
        spec,
        spec.scheduling,
        command=["python", "-m", "trainer", *job.trainer_args(VOLUME_MOUNT)],
        env=env,
        resources=_resources(spec, min(spec.resources.gpus, 1)),  # predict uses one device
        claim_mounts=[
            *(_claim_mount(path, read_only=True) for path in job.read_paths),
            _claim_mount(job.work_path, read_only=False),
        ],
        grace_s=5,  # nothing to save: predictions are made again
    )
    manifest = _one_try_job(
        name, job.namespace, labels, spec, pod_spec, owner=(job.name, owner_uid), pod_failure_policy=pod_failure_policy
    )
    manifest["spec"]["activeDeadlineSeconds"] = int(job.timeout_s) + PREDICT_DEADLINE_MARGIN_S
    manifest["spec"]["ttlSecondsAfterFinished"] = PREDICT_TTL_AFTER_FINISHED_S
    return manifest
