"""A list-then-watch cache of Relay's Jobs and pods in one namespace, fed by the official client's watch.

One thread per kind lists the objects labelled `app.kubernetes.io/managed-by=relay-controller`, then
watches from that list's resourceVersion; when the server answers 410 Gone (history compacted) it lists
again; connection errors back off and retry. Every change wakes the asyncio waiters of the leg (Job)
it concerns, through `loop.call_soon_threadsafe`. No polling: a leg's state is read from this cache.
Deleted pods are kept (last state seen) as `vanished`: the leg's exit facts must outlive its pod.
Pods are also indexed by their Job, so a leg's lookup costs the same with 5 or 500 legs in the namespace,
and objects are kept without `metadata.managedFields` (server-side apply bookkeeping, nothing Relay reads,
and a large part of each object).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from controller.kubernetes.jobs import MANAGED_SELECTOR

log = logging.getLogger(__name__)
WATCH_TIMEOUT_S = 45
MAX_VANISHED_PER_JOB = 8


def _job_of_pod(pod: dict[str, Any]) -> str | None:
    labels = pod.get("metadata", {}).get("labels") or {}
    return labels.get("job-name")


def _trimmed(obj: dict[str, Any]) -> dict[str, Any]:
    obj.get("metadata", {}).pop("managedFields", None)
    return obj


class NamespaceCache:
    """Jobs and pods of one namespace, as last seen; thread-safe reads."""

    def __init__(
        self, api_client: kubernetes.client.ApiClient, namespace: str, notify: Callable[[str, str], None]
    ) -> None:
        self.namespace = namespace
        self._batch = kubernetes.client.BatchV1Api(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._notify = notify
        self._lock = threading.Lock()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self._pods_by_job: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)  # job -> pod name -> pod
        self.vanished: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._synced = {"jobs": threading.Event(), "pods": threading.Event()}
        self._stop = threading.Event()
        self._responses: dict[str, Any] = {}
        self._threads = [
            threading.Thread(target=self._run, args=(kind,), name=f"watch-{kind}-{namespace}", daemon=True)
            for kind in ("jobs", "pods")
        ]

    def start(self) -> NamespaceCache:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for response in list(self._responses.values()):
            # shutdown() interrupts a read blocked in another thread; close() would wait for it.
            with contextlib.suppress(Exception):
                response.shutdown()

    def synced(self) -> bool:
        return all(event.is_set() for event in self._synced.values())

    async def wait_synced(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.synced():
            if time.monotonic() > deadline:
                raise TimeoutError(f"namespace {self.namespace}: Job/pod watch did not sync in {timeout_s}s")
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------ reads

    def job(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self.jobs.get(name)

    def pods_of(self, job_name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        with self._lock:
            live = list(self._pods_by_job.get(job_name, {}).values())
            return live, list(self.vanished.get(job_name, []))

    def jobs_with(self, label: str, value: str) -> list[dict[str, Any]]:
        with self._lock:
            return [j for j in self.jobs.values() if (j["metadata"].get("labels") or {}).get(label) == value]

    # ------------------------------------------------------------ list + watch

    def _list_fn(self, kind: str) -> Callable[..., Any]:
        return (
            self._batch.list_namespaced_job if kind == "jobs" else self._core.list_namespaced_pod  # type: ignore[return-value]
        )

    def _store_pod(self, name: str, pod: dict[str, Any] | None) -> None:
        """Set (or with None, drop) a pod in `pods` and in the by-Job index; the caller holds the lock."""
        old = self.pods.pop(name, None)
        if old is not None:
            previous = _job_of_pod(old) or ""
            self._pods_by_job[previous].pop(name, None)
            if not self._pods_by_job[previous]:
                del self._pods_by_job[previous]
        if pod is not None:
            self.pods[name] = pod
            self._pods_by_job[_job_of_pod(pod) or ""][name] = pod

    def _apply(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        obj = _trimmed(obj)
        name = obj["metadata"]["name"]
        with self._lock:
            if kind == "jobs":
                if event_type == "DELETED":
                    self.jobs.pop(name, None)
                    self.vanished.pop(name, None)
                else:
                    self.jobs[name] = obj
                job = name
            else:
                job = _job_of_pod(obj) or ""
                if event_type == "DELETED":
                    self._store_pod(name, None)  # the DELETED event carries the pod's final state
                    self.vanished[job] = [*self.vanished[job], obj][-MAX_VANISHED_PER_JOB:]
                else:
                    self._store_pod(name, obj)
        self._notify(self.namespace, job)

    def _replace_all(self, kind: str, items: list[dict[str, Any]]) -> None:
        fresh = {item["metadata"]["name"]: _trimmed(item) for item in items}
        with self._lock:
            if kind == "jobs":
                self.jobs.clear()
                self.jobs.update(fresh)
            else:
                if self._synced["pods"].is_set():
                    for name, old in self.pods.items():  # deleted while we were not watching
                        if name not in fresh:
                            job = _job_of_pod(old) or ""
                            self.vanished[job] = [*self.vanished[job], old][-MAX_VANISHED_PER_JOB:]
                self.pods.clear()
                self._pods_by_job.clear()
                for name, pod in fresh.items():
                    self._store_pod(name, pod)
            touched = {(_job_of_pod(i) if kind == "pods" else i["metadata"]["name"]) or "" for i in items}
        for job in touched:
            self._notify(self.namespace, job)

    def _run(self, kind: str) -> None:
        backoff = 0.2
        list_fn = self._list_fn(kind)
        while not self._stop.is_set():
            try:
                response = list_fn(self.namespace, label_selector=MANAGED_SELECTOR, _preload_content=False)
                listing = json.loads(response.data)
                self._replace_all(kind, listing.get("items") or [])
                self._synced[kind].set()
                version = listing["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    version = self._watch(kind, list_fn, version)
                    backoff = 0.2
            except _Gone:
                log.info("watch %s in %s: resourceVersion too old, listing again", kind, self.namespace)
            except Exception as exc:  # any API/connection error: back off, list again
                if self._stop.is_set():
                    return
                log.warning("watch %s in %s failed (%s); retrying in %.1fs", kind, self.namespace, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _watch(self, kind: str, list_fn: Callable[..., Any], version: str) -> str:
        response = list_fn(
            self.namespace,
            label_selector=MANAGED_SELECTOR,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_TIMEOUT_S,
            _request_timeout=(10, WATCH_TIMEOUT_S + 15),
            _preload_content=False,
        )
        self._responses[kind] = response
        try:
            for line in iter_resp_lines(response):
                if not line:
                    continue
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = obj["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    self._apply(kind, event["type"], obj)
        finally:
            self._responses.pop(kind, None)
            response.release_conn()
        return version


class _Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""
