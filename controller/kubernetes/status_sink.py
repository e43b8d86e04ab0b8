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

Two controller versions with different status schemas (a rolling upgrade, a CRD not upgraded with the chart):
each status write is a merge patch conditional on the resourceVersion last seen, so nothing written meanwhile
is overwritten unseen. Status fields this controller's schema does not know (a newer controller wrote them) are
carried over as they are, list items included, never dropped; fields this controller writes that the API server
pruned (the installed CRD is older) are named. Either way the run gets one Warning Event `CRDSchemaMismatch`
naming the fields and this controller's schema revision (`controller.crd.schema_revision`, also the CRD's
`relay.dev/schema-revision` annotation).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar, cast

import kubernetes
from kubernetes.client.rest import ApiException

from controller.crd import openapi_schema, schema_revision
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
    if phase == "Lost":  # bound once; its volume is gone: no StorageClass setting brings the checkpoints back
        volume = (pvc.get("spec") or {}).get("volumeName") or "(none)"
        return "ClaimLost", (
            f"claim {claim} is Lost: its PersistentVolume {volume} is gone; the checkpoints were on it. "
            "Restore that volume, or point spec.storage.claimName at another claim"
        )
    storage_class = (pvc.get("spec") or {}).get("storageClassName")
    where = f" (StorageClass {storage_class})" if storage_class else " (the default StorageClass)"
    return "ClaimPending", f"claim {claim} is {phase}{where}: {CLAIM_HINT}"


SCHEMA_MISMATCH = "CRDSchemaMismatch"
LIST_ITEM_KEYS = ("leg", "type", "step", "path")  # what names a list item (a leg, a condition, a checkpoint)
MAX_NAMED_FIELDS = 8


@functools.cache
def status_schema() -> dict[str, Any]:
    """The structural schema of `.status` this controller was built with (the one its CRD carries)."""
    return openapi_schema(CustomResourceStatus, "status")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in `value` (a stored status) that `schema` has no property for: written by another schema."""
    found: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        if properties is None:  # a map: every key is data, its values follow additionalProperties
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for key, item in value.items():
                    found += unknown_fields(item, extra, _join(path, str(key)))
            return found
        for key, item in value.items():
            if key not in properties:
                found.append(_join(path, key))
            else:
                found += unknown_fields(item, properties[key], _join(path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def _item_key(items: list[Any]) -> str | None:
    for key in LIST_ITEM_KEYS:
        if items and all(isinstance(item, dict) and key in item for item in items):
            return key
    return None


def carry_unknown(own: Any, stored: Any, schema: dict[str, Any]) -> Any:
    """`own` (what this controller writes) with every field of `stored` its schema does not know copied in.

    A merge patch leaves unknown keys of objects alone but replaces lists whole, so a newer controller's fields
    inside list items (legs, conditions) would be lost: items are matched by their name (leg number, condition
    type, ...; by position when they have none) and keep the stored item's unknown fields."""
    if isinstance(own, dict) and isinstance(stored, dict):
        properties = schema.get("properties")
        if properties is None:
            return own
        merged = dict(own)
        for key, item in stored.items():
            if key not in properties:
                merged.setdefault(key, item)
            elif key in own:
                merged[key] = carry_unknown(own[key], item, properties[key])
        return merged
    if isinstance(own, list) and isinstance(stored, list) and isinstance(schema.get("items"), dict):
        key = _item_key(own + stored)
        if key is None:
            pairs = [(item, stored[i] if i < len(stored) else None) for i, item in enumerate(own)]
        else:
            by_name = {item[key]: item for item in stored}
            pairs = [(item, by_name.get(item[key])) for item in own]
        return [item if old is None else carry_unknown(item, old, schema["items"]) for item, old in pairs]
    return own


def pruned_fields(written: Any, stored: Any, path: str = "") -> list[str]:
    """Paths this controller wrote (with a value) that the stored object lacks: the installed CRD pruned them."""
    found: list[str] = []
    if isinstance(written, dict) and isinstance(stored, dict):
        for key, item in written.items():
            if item is None or item == {} or item == []:
                continue
            if key not in stored:
                found.append(_join(path, key))
            else:
                found += pruned_fields(item, stored[key], _join(path, key))
    elif isinstance(written, list) and isinstance(stored, list):
        for index, (item, kept) in enumerate(zip(written, stored, strict=False)):
            found += pruned_fields(item, kept, f"{path}[{index}]")
    return found


def _named(paths: list[str]) -> str:
    # legs[0].x and legs[1].x are one field to a reader
    unique = list(dict.fromkeys(re.sub(r"\[\d+\]", "[]", p) for p in paths))
    more = f" and {len(unique) - MAX_NAMED_FIELDS} more" if len(unique) > MAX_NAMED_FIELDS else ""
    return ", ".join(unique[:MAX_NAMED_FIELDS]) + more


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_manifest(
    kind: str, namespace: str, name: str, uid: str, *, event_type: str, reason: str, message: str
) -> dict[str, Any]:
    """A core/v1 Event on one relay.dev object (a TrainingRun or a TrainingSweep), stamped now."""
    now = _now()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
        "involvedObject": {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": kind,
            "name": name,
            "namespace": namespace,
            "uid": uid,
        },
        "reason": reason,
        "message": message[:1024],
        "type": event_type,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
    }


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
        # Per run: (resourceVersion, status) as last read or written: the next write's precondition.
        self._seen: dict[tuple[str, str], tuple[str | None, dict[str, Any]]] = {}
        self._mismatches: set[tuple[str, str, str]] = set()  # (namespace, name, what) already told in an Event

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

    async def _load(self, namespace: str, name: str) -> bool:
        """Read the TrainingRun: its claim and its status as stored now; False when it is gone."""
        run = await self._read(
            self._custom.get_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name
        )
        if run is None:
            return False
        key = (namespace, name)
        self._claims[key] = str(((run.get("spec") or {}).get("storage") or {}).get("claimName") or "relay-shared")
        self._seen[key] = ((run.get("metadata") or {}).get("resourceVersion"), run.get("status") or {})
        return True

    async def volume_problem(self, namespace: str, name: str) -> tuple[str, str] | None:
        """Why the run's claim is not usable yet (reason, message), or None once it is Bound."""
        key = (namespace, name)
        if key in self._problems and self._problems[key] is None:
            return None
        claim = self._claims.get(key)
        if claim is None:
            if not await self._load(namespace, name):
                return None  # the TrainingRun is gone; publish() says so
            claim = self._claims[key]
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
        own = resource.model_dump(mode="json", by_alias=True)
        updated = await self._write_status(namespace, name, own)
        if updated is None:
            log.info("%s/%s: TrainingRun is gone; status not published", namespace, name)
            return
        events += self._mismatch_events(key, own, updated)
        uid = str(cast(dict[str, Any], updated)["metadata"]["uid"])  # the client types custom objects as object
        for event in events:
            await self.emit(namespace, name, uid, event)

    async def _write_status(self, namespace: str, name: str, own: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch `own` into `.status`, conditional on the resourceVersion last seen and keeping the fields
        this schema does not know; on a conflict (someone wrote meanwhile) read again and retry. None: gone."""
        key = (namespace, name)
        for _ in range(10):
            if key not in self._seen and not await self._load(namespace, name):
                return None
            version, stored = self._seen[key]
            status = carry_unknown(own, stored, status_schema()) if unknown_fields(stored, status_schema()) else own
            body: dict[str, Any] = {"status": status}
            if version:
                body["metadata"] = {"resourceVersion": version}
            try:
                updated = await self._call(
                    self._custom.patch_namespaced_custom_object_status, API_GROUP, API_VERSION, namespace, PLURAL,
                    name, body,
                )  # fmt: skip
            except ApiException as exc:
                if exc.status == 404:
                    self._seen.pop(key, None)
                    return None
                if exc.status == 409:  # written since we last saw it: look again
                    self._seen.pop(key, None)
                    continue
                raise
            found = cast(dict[str, Any], updated)
            self._seen[key] = ((found.get("metadata") or {}).get("resourceVersion"), found.get("status") or {})
            return found
        raise RuntimeError(f"{namespace}/{name}: status kept changing under 10 conditional writes")

    def _mismatch_events(self, key: tuple[str, str], own: dict[str, Any], updated: dict[str, Any]) -> list[RunEvent]:
        """A Warning, once per run and direction, when the stored status and this controller's schema differ."""
        if "status" not in updated:
            return []
        stored = updated["status"] or {}
        revision = schema_revision()
        found: list[RunEvent] = []
        unknown = unknown_fields(stored, status_schema())
        if unknown and (*key, "newer") not in self._mismatches:
            self._mismatches.add((*key, "newer"))
            message = (
                f"status fields {_named(unknown)} were written by a controller with a newer TrainingRun schema than "
                f"this one's (schema revision {revision}); they are kept as they are, never rewritten: finish "
                "upgrading the controller"
            )
            found.append(RunEvent(type="Warning", reason=SCHEMA_MISMATCH, message=message))
        pruned = pruned_fields(own, stored)
        if pruned and (*key, "older") not in self._mismatches:
            self._mismatches.add((*key, "older"))
            message = (
                f"the installed TrainingRun CRD is older than this controller (schema revision {revision}): it "
                f"dropped the status fields {_named(pruned)}; apply this version's CRD "
                "(helm upgrade does not update crds/: kubectl apply -f the chart's crds/trainingruns.relay.dev.yaml)"
            )
            found.append(RunEvent(type="Warning", reason=SCHEMA_MISMATCH, message=message))
        for event in found:
            log.warning("%s/%s: %s: %s", *key, event.reason, event.message)
        return found

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
        body = event_manifest(
            KIND, namespace, name, uid, event_type=event.type, reason=event.reason, message=event.message
        )
        await self._call(self._core.create_namespaced_event, namespace, body)
