"""Publish a run's status to its TrainingRun: the `/status` subresource and core/v1 Events.

`KubernetesStatusSink` implements area 2's StatusSink protocol (`controller.activities.StatusSink`).
What goes into `.status` is `CustomResourceStatus`: the RunStatus (trimmed to the newest legs) plus a few
display fields that `kubectl get trainingruns` prints (progress as a percentage, the number of legs).
Events carry the TrainingRun's uid, so `kubectl describe` lists them. A TrainingRun that is gone (404) is
not an error: the run was deleted and the workflow is being cancelled. Transient API errors are retried
by the backend's `_call`-style helper here; anything else propagates (the activity retries).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException
from pydantic import Field

from controller.kubernetes.backend import KubernetesUnavailable, is_transient
from controller.spec import API_GROUP, API_VERSION, KIND, PLURAL
from controller.status import RunEvent, RunStatus

log = logging.getLogger(__name__)
COMPONENT = "relay-controller"


class CustomResourceStatus(RunStatus):
    """`.status` of a TrainingRun: RunStatus plus fields only `kubectl get` needs."""

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


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubernetesStatusSink:
    def __init__(self, api_client: kubernetes.client.ApiClient, *, api_retry_s: float = 60.0) -> None:
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self.api_retry_s = api_retry_s

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self.api_retry_s
        delay = 0.2
        while True:
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise KubernetesUnavailable(f"Kubernetes API kept failing: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def publish(self, namespace: str, name: str, status: RunStatus, events: list[RunEvent]) -> None:
        body = {"status": CustomResourceStatus.from_run_status(status).model_dump(mode="json", by_alias=True)}
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
        uid = str(updated["metadata"]["uid"])
        for event in events:
            await self.emit(namespace, name, uid, event)

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
