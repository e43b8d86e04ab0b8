"""The controller's Job/pod cache (NamespaceCache) against the real API server: what a leg's lookups see.

Pods are created directly, pinned to no node (they stay Pending), so no kubelet or Job controller is involved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import kubernetes
import pytest

from controller.kubernetes.informer import NamespaceCache
from controller.kubernetes.jobs import MANAGED_BY

pytestmark = pytest.mark.cluster


def make_pod(core: kubernetes.client.CoreV1Api, namespace: str, name: str, job: str, managed: bool = True) -> None:
    labels = {"job-name": job, **({"app.kubernetes.io/managed-by": MANAGED_BY} if managed else {})}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeSelector": {"relay.dev/test": "no-such-node"},
            "automountServiceAccountToken": False,
            "containers": [{"name": "trainer", "image": "relay-trainer:test"}],
        },
    }
    core.create_namespaced_pod(namespace, pod)


def until(check: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def names(pods: list[dict[str, Any]]) -> set[str]:
    return {p["metadata"]["name"] for p in pods}


def test_cache_finds_each_legs_pods_keeps_deleted_ones_and_drops_managed_fields(
    kube: kubernetes.client.ApiClient, namespace: str
) -> None:
    core = kubernetes.client.CoreV1Api(kube)
    make_pod(core, namespace, "a-1", job="run-a-leg-0")
    make_pod(core, namespace, "a-2", job="run-a-leg-0")
    make_pod(core, namespace, "b-1", job="run-b-leg-0")
    make_pod(core, namespace, "foreign", job="run-a-leg-0", managed=False)  # not Relay's: never cached
    raw = json.loads(core.read_namespaced_pod("a-1", namespace, _preload_content=False).data)
    assert raw["metadata"].get("managedFields"), "the API server should record managedFields on create"

    cache = NamespaceCache(kube, namespace, lambda _ns, _job: None).start()
    try:
        until(cache.synced, "the cache never synced")
        assert names(cache.pods_of("run-a-leg-0")[0]) == {"a-1", "a-2"}
        assert names(cache.pods_of("run-b-leg-0")[0]) == {"b-1"}
        assert cache.pods_of("run-c-leg-0") == ([], [])
        assert all("managedFields" not in p["metadata"] for p in cache.pods.values())

        make_pod(core, namespace, "a-3", job="run-a-leg-0")  # seen through the watch, after the list
        until(lambda: names(cache.pods_of("run-a-leg-0")[0]) == {"a-1", "a-2", "a-3"}, "a-3 never cached")
        core.delete_namespaced_pod("a-1", namespace, grace_period_seconds=0)
        until(lambda: names(cache.pods_of("run-a-leg-0")[0]) == {"a-2", "a-3"}, "a-1 still live in the cache")
        vanished = cache.pods_of("run-a-leg-0")[1]
        assert names(vanished) == {"a-1"}  # its last state outlives it: the leg's exit facts
        assert "managedFields" not in vanished[0]["metadata"]
        assert names(cache.pods_of("run-b-leg-0")[0]) == {"b-1"}
    finally:
        cache.stop()
