"""Cluster objects a Relay run needs on a bare control plane: the TrainingRun CRD, and a namespace with a bound claim.

envtest runs no storage provisioner, so the namespace's `relay-shared` claim is bound to a PersistentVolume here,
as the PV controller would leave it; pods are refused until the ServiceAccount controller has made `default`,
so `make_namespace` waits for it.
"""

from __future__ import annotations

import time
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from controller.crd import crd_manifest


def install_crd(kube: kubernetes.client.ApiClient, timeout_s: float = 30) -> dict[str, Any]:
    """Create (or replace with this build's) TrainingRun CRD and wait until it is Established."""
    api: Any = kubernetes.client.ApiextensionsV1Api(kube)  # plain dicts in and out
    manifest: dict[str, Any] = crd_manifest()
    name = manifest["metadata"]["name"]
    try:
        api.create_custom_resource_definition(manifest)
    except ApiException as exc:  # installed before (by the chart, another test): make it this build's
        if exc.status != 409:
            raise
        current = api.read_custom_resource_definition(name)
        body = {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": current.metadata.resource_version}}
        api.replace_custom_resource_definition(name, body)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        crd = api.read_custom_resource_definition(name)
        if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
            return manifest
        time.sleep(0.1)
    raise TimeoutError(f"CRD {name} not Established after {timeout_s:g}s")


def create_bound_claim(
    kube: kubernetes.client.ApiClient, namespace: str, claim: str = "relay-shared", timeout_s: float = 30
) -> None:
    """A PVC bound to a PV (no provisioner here), as the PV controller leaves it: both Bound, each naming the other.

    The PV names the claim by uid, so the PV controller's syncs keep it so. A PV that named the claim by name only,
    created before it, raced the PV controller's cache: the claim was marked Lost (its volume not seen yet) and
    stayed Lost, so every run showed VolumeReady=False. The controller binds a claim on its own only within its
    15 s resync; the claim's status is set here once the controller has the volume (PV Bound), the same status
    its next sync would write.
    """
    core = kubernetes.client.CoreV1Api(kube)
    pv_name = f"pv-{namespace}-{claim}"[:63]
    pvc: Any = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": pv_name,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    created: Any = core.create_namespaced_persistent_volume_claim(namespace, pvc)
    claim_ref = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": namespace, "name": claim}
    pv: Any = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "10Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": f"/tmp/{pv_name}"},
            "claimRef": {**claim_ref, "uid": created.metadata.uid},
        },
    }
    core.create_persistent_volume(pv)
    deadline = time.monotonic() + timeout_s
    while getattr(core.read_persistent_volume(pv_name).status, "phase", None) != "Bound":
        if time.monotonic() > deadline:
            raise TimeoutError(f"PersistentVolume {pv_name}: not Bound after {timeout_s:g}s")
        time.sleep(0.02)
    bound = {"phase": "Bound", "accessModes": ["ReadWriteMany"], "capacity": {"storage": "10Gi"}}
    core.patch_namespaced_persistent_volume_claim_status(claim, namespace, {"status": bound})


def make_namespace(
    kube: kubernetes.client.ApiClient, namespace: str, claim: str = "relay-shared", timeout_s: float = 30
) -> None:
    """A fresh namespace with a bound claim and its default ServiceAccount."""
    core = kubernetes.client.CoreV1Api(kube)
    body: Any = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    core.create_namespace(body)
    create_bound_claim(kube, namespace, claim)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            core.read_namespaced_service_account("default", namespace)
            return
        except ApiException:
            time.sleep(0.1)
    raise TimeoutError(f"namespace {namespace}: no default ServiceAccount after {timeout_s:g}s")
