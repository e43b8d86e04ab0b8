"""Publish a run's status to its TrainingRun: the `/status` subresource and core/v1 Events.

`KubernetesStatusSink` implements area 2's StatusSink protocol (`controller.activities.StatusSink`).
What goes into `.status` is `controller.spec.CustomResourceStatus`: the RunStatus (trimmed to the newest
legs) plus a few display fields that `kubectl get trainingruns` prints (progress as a percentage, the
number of legs) and, while the run's PersistentVolumeClaim is not Bound, a `VolumeReady=False` condition
whose message says what to change (a chart's default claim on a cluster without an RWX default
StorageClass stays Pending forever, silently otherwise). Events carry the TrainingRun's uid, so
`kubectl describe` lists them. A TrainingRun that is gone (404) is not an error: the run was deleted and
the workflow is being cancelled. Transient API errors are retried (`controller.kubernetes.api`); anything
else propagates (the activity retries).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar, cast

import kubernetes
from kubernetes.client.rest import ApiException

from controller.kubernetes.api import call_with_retry
from controller.spec import API_GROUP, API_VERSION, KIND, PLURAL, CustomResourceStatus, ResourceCondition
from controller.status import RunEvent, RunStatus, rfc3339

log = logging.getLogger(__name__)
T = TypeVar("T")
COMPONENT = "relay-controller"
CLAIM_HINT = "set persistence.storageClassName to an RWX class, or persistence.existingClaim"


def claim_problem(claim: str, namespace: str, pvc: dict[str, Any] | None) -> tuple[str, str] | None:
    """(reason, message) of a VolumeReady=False condition for the run's claim as read (None: not found),
    or None when the claim is Bound."""
    if pvc is None:
        return "ClaimNotFound", f"claim {claim} not found in {namespace}: create it, or {CLAIM_HINT}"
    phase = (pvc.get("status") or {}).get("phase") or "Pending"
    if phase == "Bound":
        return None
    storage_class = (pvc.get("spec") or {}).get("storageClassName")
    where = f" (StorageClass {storage_class})" if storage_class else " (the default StorageClass)"
    return "ClaimPending", f"claim {claim} is {phase}{where}: {CLAIM_HINT}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubernetesStatusSink:
    def __init__(self, api_client: kubernetes.client.ApiClient, *, api_retry_s: float = 60.0) -> None:
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._api_client = api_client
        self.api_retry_s = api_retry_s
        # Per run (namespace, name): its claim, read once from the TrainingRun, and the claim's last problem.
        # A claim once Bound is not read again: binding is for the claim's lifetime, so a running controller
        # reads each claim about once, however often it publishes.
        self._claims: dict[tuple[str, str], str] = {}
        self._problems: dict[tuple[str, str], tuple[str, str] | None] = {}

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await call_with_retry(fn, *args, retry_s=self.api_retry_s, **kwargs)

    async def _read(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        """One object as a plain dict, or None when it does not exist."""
        try:
            found = await self._call(fn, *args)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found if isinstance(found, dict) else self._api_client.sanitize_for_serialization(found)  # type: ignore[no-any-return]

    async def volume_problem(self, namespace: str, name: str) -> tuple[str, str] | None:
        """Why the run's claim is not usable yet (reason, message), or None once it is Bound."""
        key = (namespace, name)
        if key in self._problems and self._problems[key] is None:
            return None
        claim = self._claims.get(key)
        if claim is None:
            run = await self._read(
                self._custom.get_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name
            )
            if run is None:
                return None  # the TrainingRun is gone; publish() says so
            claim = str(((run.get("spec") or {}).get("storage") or {}).get("claimName") or "relay-shared")
            self._claims[key] = claim
        pvc = await self._read(self._core.read_namespaced_persistent_volume_claim, claim, namespace)
        return claim_problem(claim, namespace, pvc)

    async def publish(self, namespace: str, name: str, status: RunStatus, events: list[RunEvent]) -> None:
        resource = CustomResourceStatus.from_run_status(status)
        key = (namespace, name)
        problem = await self.volume_problem(namespace, name)
        events = [*events, *self._volume_events(key, problem)]
        if problem is not None:
            reason, message = problem
            now = rfc3339(time.time())
            resource.conditions.append(
                ResourceCondition(
                    type="VolumeReady", status="False", reason=reason, message=message, last_transition_time=now
                )
            )
        body = {"status": resource.model_dump(mode="json", by_alias=True)}
        try:
            updated = await self._call(
                self._custom.patch_namespaced_custom_object_status,
                API_GROUP,
                API_VERSION,
                namespace,
                PLURAL,
                name,
                body,
            )
        except ApiException as exc:
            if exc.status == 404:
                log.info("%s/%s: TrainingRun is gone; status not published", namespace, name)
                return
            raise
        uid = str(cast(dict[str, Any], updated)["metadata"]["uid"])  # the client types custom objects as object
        for event in events:
            await self.emit(namespace, name, uid, event)

    def _volume_events(self, key: tuple[str, str], problem: tuple[str, str] | None) -> list[RunEvent]:
        """A Warning when the claim's problem appears or changes, a Normal event when it is gone."""
        before = self._problems.get(key)
        self._problems[key] = problem
        if problem is not None and problem != before:
            return [RunEvent(type="Warning", reason=problem[0], message=problem[1])]
        if problem is None and before is not None:
            return [RunEvent(reason="ClaimBound", message=f"claim {self._claims.get(key, '')} is Bound")]
        return []

    async def emit(self, namespace: str, name: str, uid: str, event: RunEvent) -> None:
        """One core/v1 Event on the TrainingRun (what `kubectl describe` shows)."""
        now = _now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": name,
                "namespace": namespace,
                "uid": uid,
            },
            "reason": event.reason,
            "message": event.message[:1024],
            "type": event.type,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
        }
        await self._call(self._core.create_namespaced_event, namespace, body)
