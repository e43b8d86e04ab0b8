"""Build the batch/v1 Job of one training leg: a pure function from a LegSpec to a manifest dict.

No API calls here, so it is unit-tested without a cluster. One Job per leg, named `<run>-leg-<n>`;
the workflow, not the Job controller, decides about the next leg (`backoffLimit: 0`, `restartPolicy:
Never`). The claim is mounted twice: the run's own folder read-write and the dataset snapshot read-only,
both at the same paths under /relay-volume that the trainer's command line names.
"""

from __future__ import annotations

from typing import Any

from controller.backends.base import LegSpec
from controller.spec import API_GROUP, API_VERSION, KIND, cpu_threads

VOLUME_MOUNT = "/relay-volume"
VOLUME_NAME = "relay-volume"
TRAINER_CONTAINER = "trainer"
MANAGED_BY = "relay-controller"
LABEL_RUN = "relay.dev/run"
LABEL_LEG = "relay.dev/leg"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ANNOTATION_WORKFLOW = "relay.dev/workflow-id"
# Written by the backend onto a leg's Job once the leg has ended: the LegTermination as JSON.
ANNOTATION_TERMINATION = "relay.dev/termination"
NON_ROOT_UID = 1000
MAX_NAME = 63

# Selects every Job and pod Relay made (the backend's watches use it).
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"


def job_name(run_name: str, leg: int) -> str:
    """`<run>-leg-<n>`; spec.py caps run names at 40 characters, so this always fits a DNS label."""
    name = f"{run_name}-leg-{leg}"
    if len(name) > MAX_NAME:
        raise ValueError(f"metadata.name: {run_name!r} is too long for Job names ({name!r} > {MAX_NAME} characters)")
    return name


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
    return [
        "python",
        "-m",
        "trainer",
        "train",
        "--run-dir",
        f"{VOLUME_MOUNT}/{leg.run_path}",
        "--snapshot",
        f"{VOLUME_MOUNT}/{leg.snapshot_path}",
        "--config",
        f"{VOLUME_MOUNT}/{leg.config_path}",
    ]


def build_leg_job(leg: LegSpec) -> dict[str, Any]:
    """The Job manifest of `leg`; the same LegSpec always gives the same manifest."""
    spec = leg.spec
    name = job_name(leg.name, leg.leg)
    labels = leg_labels(leg)
    job_labels = dict(labels)
    if spec.scheduling.kueue_queue:
        job_labels[KUEUE_QUEUE_LABEL] = spec.scheduling.kueue_queue
    profile = spec.scheduling
    if leg.use_fallback_profile and spec.scheduling.fallback is not None:
        profile = spec.scheduling.fallback  # type: ignore[assignment]

    threads = cpu_threads(spec.resources.cpu)
    requests: dict[str, str] = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    limits: dict[str, str] = {"memory": spec.resources.memory}
    if spec.resources.gpus > 0:
        requests["nvidia.com/gpu"] = str(spec.resources.gpus)
        limits["nvidia.com/gpu"] = str(spec.resources.gpus)

    env = {
        "PYTHONUNBUFFERED": "1",
        "HOME": "/tmp",
        "OMP_NUM_THREADS": str(threads),
        "RELAY_RUN_NAMESPACE": leg.namespace,
        "RELAY_RUN_NAME": leg.name,
        "RELAY_LEG": str(leg.leg),
        **leg.extra_env,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": NON_ROOT_UID,
            "fsGroup": NON_ROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "image": spec.image,
                "imagePullPolicy": "IfNotPresent",
                "command": trainer_command(leg),
                "env": [{"name": key, "value": value} for key, value in sorted(env.items())],
                "resources": {"requests": requests, "limits": limits},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "privileged": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": VOLUME_NAME, "mountPath": f"{VOLUME_MOUNT}/{leg.run_path}", "subPath": leg.run_path},
                    {
                        "name": VOLUME_NAME,
                        "mountPath": f"{VOLUME_MOUNT}/{leg.snapshot_path}",
                        "subPath": leg.snapshot_path,
                        "readOnly": True,
                    },
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

    metadata: dict[str, Any] = {
        "name": name,
        "namespace": leg.namespace,
        "labels": job_labels,
        "annotations": {ANNOTATION_WORKFLOW: f"trainingrun-{leg.namespace}-{leg.name}"},
    }
    if leg.owner_uid:
        metadata["ownerReferences"] = [owner_reference(leg.name, leg.owner_uid)]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": 0,
            "completions": 1,
            "parallelism": 1,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
