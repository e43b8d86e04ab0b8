"""Two controller versions, two TrainingRun schemas (envtest): the status is never corrupted, and an Event says so.

A newer controller's CRD adds status fields (one at the top, one inside each leg); this build's status sink,
facing a status a newer controller wrote, writes its own fields and keeps the newer ones intact, list items
included, even when the newer controller writes again in between; it posts one Warning `CRDSchemaMismatch`.
Facing an older CRD (a field of this build's missing, so the API server prunes it), it names the dropped field.
The CRD carries this build's schema revision as an annotation.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from controller.crd import SCHEMA_REVISION_ANNOTATION, crd_manifest, schema_revision
from controller.kubernetes.status_sink import SCHEMA_MISMATCH, KubernetesStatusSink
from controller.spec import API_GROUP, API_VERSION, PLURAL
from controller.status import LegStatus, Phase, RunStatus
from relay_testing.control_plane import ControlPlane
from relay_testing.objects import install_crd

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
NEWER_REVISION = "0123456789ab"


def status_properties(manifest: dict[str, Any]) -> dict[str, Any]:
    root = manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return root["properties"]["status"]["properties"]  # type: ignore[no-any-return]


def newer_crd() -> dict[str, Any]:
    """This build's CRD plus what a next version might add: a status object and a field in every leg."""
    manifest = copy.deepcopy(crd_manifest())
    manifest["metadata"]["annotations"][SCHEMA_REVISION_ANNOTATION] = NEWER_REVISION
    properties = status_properties(manifest)
    properties["throughput"] = {"type": "object", "properties": {"tokensPerS": {"type": "number"}}}
    properties["legs"]["items"]["properties"]["gpuSeconds"] = {"type": "number"}
    return manifest


def older_crd() -> dict[str, Any]:
    """This build's CRD without `status.legCount`, as a previous version might have had it."""
    manifest = copy.deepcopy(crd_manifest())
    manifest["metadata"]["annotations"][SCHEMA_REVISION_ANNOTATION] = "ba9876543210"
    del status_properties(manifest)["legCount"]
    return manifest


def apply_crd(kube: kubernetes.client.ApiClient, manifest: dict[str, Any]) -> None:
    api: Any = kubernetes.client.ApiextensionsV1Api(kube)
    current = api.read_custom_resource_definition(manifest["metadata"]["name"])
    body = {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": current.metadata.resource_version}}
    api.replace_custom_resource_definition(manifest["metadata"]["name"], body)


@pytest.fixture
def restore_crd(kube: kubernetes.client.ApiClient, crd_installed: Any) -> Iterator[None]:
    """The other tests of the session run on this build's CRD: put it back whatever happens here."""
    yield
    install_crd(kube)


class Run:
    def __init__(self, kube: kubernetes.client.ApiClient, namespace: str, name: str) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(kube)
        self.core = kubernetes.client.CoreV1Api(kube)
        self.namespace, self.name = namespace, name
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "TrainingRun", "metadata": {"name": name},
                "spec": {"dataset": {"source": "demo"}}}  # fmt: skip
        self.custom.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, body)

    def status(self) -> dict[str, Any]:
        run: Any = self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace, PLURAL, self.name)
        return run.get("status") or {}

    def write_as_newer_controller(self, status: dict[str, Any], timeout_s: float = 20) -> None:
        """Patch the status as a newer controller would, until the API server keeps the newer fields (a replaced
        CRD's schema takes effect a moment after the replace)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, self.namespace, PLURAL, self.name, {"status": status}
            )
            if "throughput" in self.status():
                return
            assert time.monotonic() < deadline, "the newer CRD's schema never took effect"
            time.sleep(0.2)

    def mismatch_events(self) -> list[str]:
        events = self.core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={self.name}")
        return [str(e.message) for e in events.items if e.reason == SCHEMA_MISMATCH and e.type == "Warning"]


def running(step: int) -> RunStatus:
    return RunStatus(phase=Phase.RUNNING, step=step, total_steps=100, current_leg=0, legs=[LegStatus(leg=0)])


async def test_an_older_controller_keeps_a_newer_controllers_status_fields_and_says_so(
    control_plane: ControlPlane, kube: kubernetes.client.ApiClient, namespace: str, restore_crd: None
) -> None:
    await asyncio.to_thread(apply_crd, kube, newer_crd())
    run = await asyncio.to_thread(Run, kube, namespace, "mixed")
    newer = {"phase": "Running", "step": 5, "legs": [{"leg": 0, "startStep": 0, "gpuSeconds": 12.5}],
             "throughput": {"tokensPerS": 900.0}}  # fmt: skip
    await asyncio.to_thread(run.write_as_newer_controller, newer)

    sink = KubernetesStatusSink(control_plane.api_client(), api_retry_s=10.0)  # this build: the older schema
    await sink.publish(namespace, "mixed", running(10), [])
    status = await asyncio.to_thread(run.status)
    assert status["step"] == 10 and status["totalSteps"] == 100, "this controller's own fields were not written"
    assert status["throughput"] == {"tokensPerS": 900.0}, "a newer top-level field was dropped"
    assert status["legs"][0].get("gpuSeconds") == 12.5, f"a newer field inside a leg was dropped: {status['legs']}"

    # The newer controller writes again; the older one's next write must not put back what it saw before.
    newer.update(step=20, legs=[{"leg": 0, "startStep": 0, "gpuSeconds": 30.0}], throughput={"tokensPerS": 950.0})
    await asyncio.to_thread(run.write_as_newer_controller, newer)
    await sink.publish(namespace, "mixed", running(21), [])
    status = await asyncio.to_thread(run.status)
    assert status["step"] == 21
    assert status["throughput"] == {"tokensPerS": 950.0} and status["legs"][0]["gpuSeconds"] == 30.0, status

    (message,) = await asyncio.to_thread(run.mismatch_events)  # once per run, not at every publish
    assert "throughput" in message and "legs[].gpuSeconds" in message, message
    assert f"schema revision {schema_revision()}" in message and "newer" in message


async def test_a_newer_controller_on_an_older_crd_names_the_fields_the_api_server_dropped(
    control_plane: ControlPlane, kube: kubernetes.client.ApiClient, namespace: str, restore_crd: None
) -> None:
    await asyncio.to_thread(apply_crd, kube, older_crd())
    run = await asyncio.to_thread(Run, kube, namespace, "old-crd")
    deadline = time.monotonic() + 20
    while True:  # the older schema takes effect a moment after the replace: then legCount is pruned
        await asyncio.to_thread(run.custom.patch_namespaced_custom_object_status, API_GROUP, API_VERSION, namespace,
                                PLURAL, "old-crd", {"status": {"legCount": 4}})  # fmt: skip
        if "legCount" not in await asyncio.to_thread(run.status):
            break
        assert time.monotonic() < deadline, "the older CRD's schema never took effect"
        await asyncio.sleep(0.2)

    sink = KubernetesStatusSink(control_plane.api_client(), api_retry_s=10.0)
    await sink.publish(namespace, "old-crd", running(3), [])
    assert (await asyncio.to_thread(run.status))["step"] == 3
    (message,) = await asyncio.to_thread(run.mismatch_events)
    assert "legCount" in message and "older" in message and schema_revision() in message, message


async def test_the_crd_carries_the_schema_revision_of_this_build(
    kube: kubernetes.client.ApiClient, crd_installed: Any
) -> None:
    api = kubernetes.client.ApiextensionsV1Api(kube)
    crd: Any = await asyncio.to_thread(api.read_custom_resource_definition, f"{PLURAL}.{API_GROUP}")
    assert crd.metadata.annotations[SCHEMA_REVISION_ANNOTATION] == schema_revision()
    assert len(schema_revision()) == 12
