"""What the API server offers: its version (from /version) and the Eviction API version, read once per client.

Users run Kubernetes 1.28 to 1.34; the test control plane is 1.20. Relay uses a newer API where the
server has it and the old one only where it must:
- Eviction through `policy/v1` when discovery of `/api/v1` says `pods/eviction` takes it (1.22+;
  `v1beta1` was removed in 1.25), else `policy/v1beta1` (1.20, 1.21: there `policy/v1` already lists
  PodDisruptionBudget but not Eviction, so the group's version list is not enough). `evict_pod` is the
  one place that decides. Relay creates no PodDisruptionBudget.
- A Job `podFailurePolicy` from 1.26 on (beta and on by default there; GA in 1.31), see
  `controller.kubernetes.jobs.POD_FAILURE_POLICY`.

Both are read with two small GETs the first time a client asks and cached for that client's lifetime (a
server is not downgraded under a running controller; an upgrade is picked up at the next restart).
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass

import kubernetes
from kubernetes.client.rest import ApiException

POD_FAILURE_POLICY_MINOR = 26  # Job podFailurePolicy beta (on by default) and the DisruptionTarget condition
_MINOR = re.compile(r"^(\d+)")


@dataclass(frozen=True)
class ServerFeatures:
    """The server's version and the newest policy API it serves."""

    major: int
    minor: int
    policy_version: str  # of Eviction: "v1" or "v1beta1"

    @property
    def pod_failure_policy(self) -> bool:
        return (self.major, self.minor) >= (1, POD_FAILURE_POLICY_MINOR)


def parse_version(major: str, minor: str) -> tuple[int, int]:
    """(1, 26) from /version's strings; managed clusters report minors such as "26+"."""
    found = _MINOR.match(minor or "")
    if not major.isdigit() or found is None:
        raise ValueError(f"/version: cannot read major {major!r}, minor {minor!r}")
    return int(major), int(found.group(1))


def eviction_version_of(resources: list[tuple[str, str | None, str | None]]) -> str:
    """The policy version `pods/eviction` takes, from /api/v1's discovery (name, group, version) triples."""
    for name, group, version in resources:
        if name == "pods/eviction" and group == "policy" and version == "v1":
            return "v1"
    return "v1beta1"


_cache: weakref.WeakKeyDictionary[kubernetes.client.ApiClient, ServerFeatures] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def server_features(api_client: kubernetes.client.ApiClient) -> ServerFeatures:
    """The server's features, read on first use per client (blocking: call it from a thread)."""
    with _lock:
        known = _cache.get(api_client)
    if known is not None:
        return known
    code = kubernetes.client.VersionApi(api_client).get_code()
    major, minor = parse_version(str(code.major), str(code.minor))
    listing = kubernetes.client.CoreV1Api(api_client).get_api_resources()
    resources = [(r.name, r.group, r.version) for r in listing.resources or []]
    features = ServerFeatures(major, minor, eviction_version_of(resources))
    with _lock:
        _cache[api_client] = features
    return features


def eviction_body(namespace: str, name: str, policy_version: str) -> kubernetes.client.V1Eviction:
    """An Eviction in `policy/<policy_version>` (the client's model serialises whatever apiVersion it holds)."""
    return kubernetes.client.V1Eviction(
        api_version=f"policy/{policy_version}",
        kind="Eviction",
        metadata=kubernetes.client.V1ObjectMeta(name=name, namespace=namespace),
    )


def evict_pod(api_client: kubernetes.client.ApiClient, namespace: str, name: str) -> bool:
    """Evict a pod through the Eviction API (its PodDisruptionBudget decides; the kubelet sends SIGTERM), in
    the policy version the server serves. True when evicted, False when the pod was already gone; a budget
    that forbids it raises ApiException 429 (blocking: call it from a thread)."""
    body = eviction_body(namespace, name, server_features(api_client).policy_version)
    try:
        kubernetes.client.CoreV1Api(api_client).create_namespaced_pod_eviction(name, namespace, body)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True
