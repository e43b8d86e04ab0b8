"""KubernetesBackend: each training leg is one batch/v1 Job; its state is read from a watch-fed cache.

Implements `controller.backends.base.Backend`. `launch` first re-reads the TrainingRun from the API server:
its uid must be the leg's `owner_uid` and the Job is built from the object's own spec (image, resources,
scheduling, claim) and its own run folder, never from what the workflow input says (`_trusted_leg`).
It creates `<run>-leg-<n>` or adopts it when it
already exists (a restarted controller, a retried activity), and waits for, then refuses, a different leg
of the same run that is still alive. `observe` and `wait_for_change` judge the Job and its pods
(`controller.kubernetes.legs.judge_leg`) from the cache and carry out the verdict: halt the Job so the 1.20
Job controller starts no replacement pod, record the termination on the Job, and for a lost leg (its node
NotReady past nodeLostAfterSeconds, its pod Unknown, its progress stalled: issue 13) delete its pods and Job
with grace 0, which fencing keeps safe even if the node never hears of it. API calls run in a thread
pool and transient errors (connection, 429, 5xx) are retried with backoff (`controller.kubernetes.api`),
never reported as a leg outcome. Every wait on the watch (a leg's change, a predict Job's end, a Job's
deletion, another leg's exit) is one `_wait_for_wake`.

`predict` runs a one-shot predict Job with the TrainingRun's image, resources and scheduling, judges it by
the same rules (an unschedulable pod or a failing image pull is stuck after `stuckAfterSeconds`), reads the
predictions from the volume the controller mounts (`volume_root`), and deletes the Job (foreground: its pod
goes first) on every way out, cancellation and timeout included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import kubernetes
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from controller.backends.base import (
    LegConflict,
    PredictFailed,
    RunIdentityMismatch,
    prepare_predict_work,
    read_predictions,
    remove_predict_work,
)
from controller.kubernetes.api import call_with_retry
from controller.kubernetes.informer import NamespaceCache
from controller.kubernetes.jobs import (
    ANNOTATION_TERMINATION,
    LABEL_LEG,
    LABEL_RUN,
    build_leg_job,
    build_predict_job,
    build_rendezvous_service,
    job_name,
    predict_job_name,
)
from controller.kubernetes.legs import (
    LegVerdict,
    LostLegLimits,
    job_alive,
    judge_leg,
    parse_time,
    world_size_change,
)
from controller.kubernetes.server import ServerFeatures, server_features
from controller.kubernetes.status_sink import event_manifest
from controller.leg_model import LegHandle, LegObservation, LegSpec, LegState, LegTermination, Prediction, PredictJob
from controller.policy import Policy, check_policy
from controller.spec import API_GROUP, API_VERSION, KIND, PLURAL, TrainingRunSpec, volume_model
from controller.waiting import wait_event
from trainer import volume
from trainer.volume.tenancy import ForeignPath, check_resolved_read

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a leg may mount read-only besides its run folder: a content-addressed dataset snapshot.
SNAPSHOT_PATH = re.compile(r"snapshots/[0-9a-f]{64}")


INDEXED_JOB_MINOR = 24  # Job completionMode Indexed: alpha 1.21, GA 1.24; an older server drops the field


def multinode_refusal(spec: TrainingRunSpec, features: ServerFeatures) -> str | None:
    """Why this server cannot run `spec`'s legs (a multi-node leg needs an Indexed Job), or None. A server without
    Indexed Jobs prunes completionMode and would run M unindexed pods that never meet: refused, never attempted."""
    nodes = spec.resources.nodes
    if nodes > 1 and (features.major, features.minor) < (1, INDEXED_JOB_MINOR):
        return (
            f"spec.resources.nodes: {nodes} nodes need an Indexed Job (Kubernetes 1.{INDEXED_JOB_MINOR}+); this API "
            f"server is v{features.major}.{features.minor}: use resources.nodes 1, or a newer cluster"
        )
    return None


def _owner_uids(job: dict[str, Any]) -> list[str | None]:
    return [ref.get("uid") for ref in job["metadata"].get("ownerReferences") or []]


def _same_owner(where: str, owner_uid: str | None, uid: str) -> None:
    if owner_uid != uid:
        raise RunIdentityMismatch(f"{where}: owner_uid {owner_uid!r} is not the object's uid {uid!r}")


# How often a waiting leg is judged again without a watch event: the lost-leg checks (issue 13) then notice a
# NotReady node within nodeLostAfterSeconds + this + a node read's age, where the workflow's poll alone took up to
# 10 s more.
LOST_LEG_CHECK_S = 1.0
# A leg's Node is read again once the last read is older than a tenth of its nodeLostAfterSeconds, within these
# bounds: a NotReady node is then noticed at most 10% (at most 10 s) late. Each waiting leg is judged every second,
# and with one GPU leg per node a read a second was 60 API requests per run per minute.
NODE_READ_MAX_AGE_S = (1.0, 10.0)


def node_read_max_age(node_lost_after_s: float) -> float:
    """How old a cached Node may be for a leg whose node is lost after `node_lost_after_s` NotReady."""
    low, high = NODE_READ_MAX_AGE_S
    return min(max(node_lost_after_s / 10, low), high)


class KubernetesBackend:
    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        volume_root: Path | str | None = None,
        api_retry_s: float = 60.0,
        conflict_wait_s: float = 60.0,
        max_threads: int = 16,
        delete_wait_s: float = 60.0,
        policy: Policy | None = None,
    ) -> None:
        self._api_client = api_client
        self._batch = kubernetes.client.BatchV1Api(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="k8s-api")
        self._caches: dict[str, NamespaceCache] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation: dict[tuple[str, str], int] = {}
        self._seen: dict[tuple[str, str], int] = {}
        self._wakeups: dict[tuple[str, str], asyncio.Event] = {}
        self._job_uids: dict[tuple[str, str], str] = {}  # (namespace, Job) -> uid of the Job this backend created
        self._nodes: dict[str, tuple[float, dict[str, Any] | None]] = {}  # node name -> (read at, Node or None)
        self._node_reads: dict[str, asyncio.Future[dict[str, Any] | None]] = {}  # node name -> the read in flight
        self._lost: dict[tuple[str, str], LegObservation] = {}  # (namespace, Job) -> the verdict that deleted it
        self._world_told: set[tuple[str, str]] = set()  # (namespace, Job) whose WorldSizeChanged Event is posted
        self.volume_root = Path(volume_root).resolve() if volume_root is not None else None  # the controller's mount
        self.policy = policy or Policy()  # the cluster's allow-lists, checked again at every launch
        self.api_retry_s = api_retry_s
        self.conflict_wait_s = conflict_wait_s
        self.delete_wait_s = delete_wait_s

    # ------------------------------------------------------------ plumbing

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking client call (or a function making some) in the backend's pool, transient failures
        retried with backoff; the operator's handlers use it too, so their API calls share the pool."""
        return await call_with_retry(fn, *args, retry_s=self.api_retry_s, executor=self._pool, **kwargs)

    async def _wait_for_wake(self, key: tuple[str, str], timeout_s: float) -> None:
        """Wait until the watch reports a change of the Job `key` (namespace, name), or `timeout_s` passes."""
        event = self._wakeups.setdefault(key, asyncio.Event())
        event.clear()
        try:
            await wait_event(event, timeout_s)
        finally:
            self._wakeups.pop(key, None)

    def _wake(self, namespace: str, job: str) -> None:
        key = (namespace, job)
        self._generation[key] = self._generation.get(key, 0) + 1
        event = self._wakeups.get(key)
        if event is not None:
            event.set()

    def _notify_threadsafe(self, namespace: str, job: str) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake, namespace, job)

    async def server(self) -> ServerFeatures:
        """The API server's version and policy API version (read once per client, then cached)."""
        return await self.call(server_features, self._api_client)

    async def cache(self, namespace: str) -> NamespaceCache:
        """The namespace's Job/pod cache, started (and synced) on first use."""
        self._loop = asyncio.get_running_loop()
        cache = self._caches.get(namespace)
        if cache is None:
            cache = NamespaceCache(self._api_client, namespace, self._notify_threadsafe).start()
            self._caches[namespace] = cache
        await cache.wait_synced()
        return cache

    async def close(self) -> None:
        for cache in self._caches.values():
            cache.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ Backend protocol

    async def launch(self, leg: LegSpec) -> LegHandle:
        trusted, labels = await self._trusted_leg(leg)
        cache = await self.cache(leg.namespace)
        name = job_name(leg.name, leg.leg)
        existing = cache.job(name) or await self._read_job(leg.namespace, name)
        if existing is not None and _owner_uids(existing) != [trusted.owner_uid]:
            # The Job of an earlier object of this name, not yet collected (the garbage collector deletes it after
            # its owner, asynchronously): adopting it made a re-applied run "complete" at once. Remove it first.
            log.info("leg %s/%s: Job %s belongs to an earlier TrainingRun; deleting it", leg.namespace, leg.name, name)
            await self._delete_job(leg.namespace, name)
            existing = None
        if existing is not None:
            await self._ensure_rendezvous_service(trusted, existing)
            return self._handle(leg, existing, adopted=True)
        await self._wait_other_legs_gone(cache, leg)
        features = await self.server()
        refused = multinode_refusal(trusted.spec, features)
        if refused:
            raise RunIdentityMismatch(f"TrainingRun {leg.namespace}/{leg.name}: {refused}")
        # A model stored on the volume is mounted read-only into the leg (config.json names it there).
        model = (
            await asyncio.to_thread(volume_model, trusted.spec.model, self.volume_root) if self.volume_root else None
        )
        if model is not None and self.volume_root is not None:
            # A namespace mounts only its own models or the shared area, symlinks resolved (issue 11): prepare_run
            # refuses the same, but a workflow started by hand skips it.
            try:
                check_resolved_read(leg.namespace, self.volume_root, model, "spec.model")
            except ForeignPath as exc:
                raise RunIdentityMismatch(f"TrainingRun {leg.namespace}/{leg.name}: {exc}") from None
        manifest = build_leg_job(
            trusted, pod_failure_policy=features.pod_failure_policy, model_path=model, kueue_labels=labels
        )
        try:
            created = await self.call(self._batch.create_namespaced_job, leg.namespace, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            adopted = await self._read_job(leg.namespace, name)
            if adopted is None:
                raise
            await self._ensure_rendezvous_service(trusted, adopted)
            return self._handle(leg, adopted, adopted=True)
        log.info("leg %s/%s: created Job %s", leg.namespace, leg.name, name)
        document = self._api_client.sanitize_for_serialization(created)
        self._job_uids[(leg.namespace, name)] = document["metadata"]["uid"]
        await self._ensure_rendezvous_service(trusted, document)
        return self._handle(leg, document, adopted=False)

    async def _ensure_rendezvous_service(self, leg: LegSpec, job: dict[str, Any]) -> None:
        """A multi-node leg's headless Service, owned by its Job (created after it: a Job created by a controller
        that stopped before its Service gets it on adoption)."""
        if leg.spec.resources.nodes <= 1:
            return
        service = build_rendezvous_service(job)
        try:
            await self.call(self._core.create_namespaced_service, leg.namespace, service)
            log.info("leg %s/%s: created Service %s", leg.namespace, leg.name, service["metadata"]["name"])
        except ApiException as exc:
            if exc.status != 409:
                raise

    async def observe(self, leg: LegSpec) -> LegObservation:
        cache = await self.cache(leg.namespace)
        name = job_name(leg.name, leg.leg)
        self._seen[(leg.namespace, name)] = self._generation.get((leg.namespace, name), 0)
        job = cache.job(name)
        if job is None and (leg.namespace, name) in self._lost:
            return self._lost[(leg.namespace, name)]  # deleted as lost: the same verdict, not "Missing"
        pods, vanished = self._pods_of(cache, leg.namespace, name, job)
        lost = await self._lost_leg_limits(leg, pods)
        retries = leg.spec.retries
        verdict = judge_leg(
            job,
            pods,
            vanished,
            now=time.time(),
            stuck_after_s=retries.stuck_after_seconds,
            lost=lost,
            rendezvous_timeout_s=retries.rendezvous_timeout_seconds,
        )
        if job is not None:
            await self._carry_out(leg.namespace, job, verdict)
            if verdict.force_delete:
                self._lost[(leg.namespace, name)] = verdict.observation
                await self._force_delete_leg(leg.namespace, job, pods, verdict)
        return verdict.observation

    async def wait_for_change(self, leg: LegSpec, timeout_s: float) -> LegObservation:
        await self.cache(leg.namespace)
        key = (leg.namespace, job_name(leg.name, leg.leg))
        deadline = time.monotonic() + timeout_s
        while self._generation.get(key, 0) == self._seen.get(key, -1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self._wait_for_wake(key, min(remaining, LOST_LEG_CHECK_S))
            if self._generation.get(key, 0) == self._seen.get(key, -1):
                # Nothing the Job/pod watch sees changes when a node goes NotReady or a leg stops progressing:
                # judged again every LOST_LEG_CHECK_S (cache, the node as read within node_read_max_age, progress.json).
                observation = await self.observe(leg)
                if observation.state == LegState.TERMINATED:
                    return observation
        return await self.observe(leg)

    async def stop(self, leg: LegSpec, grace_s: float) -> LegObservation:
        cache = await self.cache(leg.namespace)
        name = job_name(leg.name, leg.leg)
        pods, _ = cache.pods_of(name)
        for pod in pods:
            await self._delete_pod(leg.namespace, pod["metadata"]["name"], grace_s)
        if cache.job(name) is not None:
            await self._patch_job(leg.namespace, name, {"spec": {"parallelism": 0}})
        deadline = time.monotonic() + grace_s + 15
        observation = await self.observe(leg)
        while observation.state in (LegState.RUNNING, LegState.PENDING) and time.monotonic() < deadline:
            observation = await self.wait_for_change(leg, max(0.1, deadline - time.monotonic()))
        return observation

    async def cleanup(self, namespace: str, name: str) -> None:
        await self.call(
            self._batch.delete_collection_namespaced_job,
            namespace,
            label_selector=f"{LABEL_RUN}={name}",
            propagation_policy="Background",
        )

    async def predict(self, job: PredictJob) -> list[Prediction]:
        if self.volume_root is None:
            raise PredictFailed("the Kubernetes backend was built without the volume root", non_retryable=True)
        try:
            spec, owner_uid = await self._run_spec(job.namespace, job.name)
        except RunIdentityMismatch as exc:
            message = f"{exc} (its predict Job takes the run's image and resources)"
            raise PredictFailed(message, non_retryable=True) from None
        cache = await self.cache(job.namespace)
        name = predict_job_name(job.name, job.request_id)
        try:
            existing = cache.job(name) or await self._read_job(job.namespace, name)
            if existing is not None and existing["metadata"].get("deletionTimestamp"):
                await self._delete_job(job.namespace, name)  # a retry after a lost worker: wait, start afresh
                existing = None
            if existing is None:
                await asyncio.to_thread(prepare_predict_work, self.volume_root, job)
                features = await self.server()
                manifest = build_predict_job(job, spec, owner_uid, pod_failure_policy=features.pod_failure_policy)
                try:
                    await self.call(self._batch.create_namespaced_job, job.namespace, manifest)
                    log.info("predict %s/%s: created Job %s", job.namespace, job.name, name)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
            else:
                log.info("predict %s/%s: adopted Job %s", job.namespace, job.name, name)
            termination = await self._await_predict_job(job, name, spec)
            where = f"predict Job {job.namespace}/{name}"
            if termination.stuck:
                raise PredictFailed(f"{where}: {termination.message}", non_retryable=True)
            if termination.exit_code is None or (termination.disrupted and termination.exit_code != 0):
                # The pod was taken away (evicted, deleted, its node lost): the activity's retry runs it again.
                raise PredictFailed(f"{where}: {termination.reason}: {termination.message}", non_retryable=False)
            message = f"{where}: {termination.message}"
            return await asyncio.to_thread(read_predictions, self.volume_root, job, termination.exit_code, message)
        finally:
            # Shielded: a cancelled activity still removes its Job (and the Job's pod) before it ends.
            await asyncio.shield(self._delete_job(job.namespace, name))
            await asyncio.to_thread(remove_predict_work, self.volume_root, job)

    async def verify_owner(self, namespace: str, name: str, owner_uid: str | None) -> None:
        """controller.backends.base.OwnerVerifying: the TrainingRun exists now, with uid `owner_uid`."""
        _, uid = await self._run_spec(namespace, name)
        _same_owner(f"TrainingRun {namespace}/{name}", owner_uid, uid)

    async def _run_spec(self, namespace: str, name: str) -> tuple[TrainingRunSpec, str]:
        """The TrainingRun's spec (image, resources, scheduling, claim) and uid, read from the API server now."""
        spec, uid, _ = await self._read_run(namespace, name)
        return spec, uid

    async def _read_run(self, namespace: str, name: str) -> tuple[TrainingRunSpec, str, dict[str, str]]:
        """The TrainingRun's spec, uid and labels (its Kueue labels go onto its leg Jobs), read now."""
        try:
            run = await self.call(
                self._custom.get_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            raise RunIdentityMismatch(f"TrainingRun {namespace}/{name}: not found") from None
        body = cast(dict[str, Any], run)  # the client types custom objects as object
        try:
            spec = TrainingRunSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            raise RunIdentityMismatch(f"TrainingRun {namespace}/{name}: invalid spec ({exc})") from None
        return spec, str(body["metadata"]["uid"]), dict(body["metadata"].get("labels") or {})

    async def _await_predict_job(self, job: PredictJob, name: str, spec: TrainingRunSpec) -> LegTermination:
        """Wait (watch-fed) until the predict Job's pod has ended, is stuck, or the request's time is up."""
        cache = await self.cache(job.namespace)
        key = (job.namespace, name)
        deadline = time.monotonic() + job.timeout_s
        stuck_after_s = min(spec.retries.stuck_after_seconds, job.timeout_s)
        while True:
            seen = self._generation.get(key, 0)
            found = cache.job(name)
            pods, vanished = self._pods_of(cache, job.namespace, name, found)
            verdict = judge_leg(found, pods, vanished, now=time.time(), stuck_after_s=stuck_after_s)
            observation = verdict.observation
            if observation.state == LegState.TERMINATED and observation.termination is not None:
                return observation.termination
            if observation.state == LegState.MISSING and await self._read_job(job.namespace, name) is None:
                return LegTermination(reason="Deleted", message="the Job was deleted before it ended", disrupted=True)
            if found is not None and verdict.halt:
                await self._carry_out(job.namespace, found, verdict)  # no replacement pod next to a going one
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                message = f"did not finish within {job.timeout_s:g}s ({observation.detail})"
                return LegTermination(reason="Timeout", message=message, stuck=True)
            if self._generation.get(key, 0) == seen:
                await self._wait_for_wake(key, min(remaining, 5.0))

    async def _delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job in the foreground (its pods first) and wait, bounded, until the watch sees it gone."""
        try:
            await self.call(self._batch.delete_namespaced_job, name, namespace, propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status != 404:
                raise
        cache = await self.cache(namespace)
        key = (namespace, name)
        deadline = time.monotonic() + self.delete_wait_s
        while cache.job(name) is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("Job %s/%s: still being deleted after %.0fs", namespace, name, self.delete_wait_s)
                return
            await self._wait_for_wake(key, min(remaining, 1.0))

    # ------------------------------------------------------------ helpers

    def _pods_of(
        self, cache: NamespaceCache, namespace: str, name: str, job: dict[str, Any] | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The live and vanished pods of this Job, not of an earlier Job of the same name (a re-applied run's
        predecessor): the cache groups pods by the job-name label, and a predecessor's finished pod once made a
        new leg look completed at once. Without a known Job uid (the Job not yet seen), every pod counts."""
        pods, vanished = cache.pods_of(name)
        uid = job["metadata"].get("uid") if job is not None else self._job_uids.get((namespace, name))
        if uid is None:
            return pods, vanished

        def of_this_job(pod: dict[str, Any]) -> bool:
            return uid in _owner_uids(pod)

        return [p for p in pods if of_this_job(p)], [p for p in vanished if of_this_job(p)]

    def _handle(self, leg: LegSpec, job: dict[str, Any], adopted: bool) -> LegHandle:
        created = parse_time(job["metadata"].get("creationTimestamp")) or time.time()
        return LegHandle(leg=leg.leg, backend_id=job["metadata"]["name"], started_at=created, adopted=adopted)

    async def _read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            job = await self.call(self._batch.read_namespaced_job, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return self._api_client.sanitize_for_serialization(job)  # type: ignore[no-any-return]

    async def _trusted_leg(self, leg: LegSpec) -> tuple[LegSpec, dict[str, str]]:
        """`leg` as its TrainingRun allows it: that object's spec, uid and run folder, with the object's labels;
        RunIdentityMismatch if not.

        Temporal's input is a hint (issue 11): a workflow started by hand once made Jobs with any image and
        priority class, and with a made-up owner uid the garbage collector deleted every Job it created.
        """
        where = f"TrainingRun {leg.namespace}/{leg.name}"
        spec, uid, labels = await self._read_run(leg.namespace, leg.name)
        _same_owner(where, leg.owner_uid, uid)
        if leg.run_path != volume.run_path(leg.namespace, leg.name):
            raise RunIdentityMismatch(f"{where}: run_path {leg.run_path!r} is not its own run folder")
        if not SNAPSHOT_PATH.fullmatch(leg.snapshot_path):
            raise RunIdentityMismatch(f"{where}: snapshot_path {leg.snapshot_path!r} is not snapshots/<sha256>")
        refused = check_policy(spec, self.policy)  # the object may be one the create handler already failed
        if refused:
            raise RunIdentityMismatch(f"{where}: {'; '.join(refused)}")
        return leg.model_copy(update={"spec": spec, "owner_uid": uid}), labels

    async def _wait_other_legs_gone(self, cache: NamespaceCache, leg: LegSpec) -> None:
        deadline = time.monotonic() + self.conflict_wait_s
        while True:
            alive = []
            for job in cache.jobs_with(LABEL_RUN, leg.name):
                other = job["metadata"]["name"]
                if (job["metadata"].get("labels") or {}).get(LABEL_LEG) == str(leg.leg):
                    continue
                if job_alive(job, cache.pods_of(other)[0]):
                    alive.append(other)
            if not alive:
                return
            if time.monotonic() > deadline:
                raise LegConflict(
                    f"{leg.namespace}/{leg.name}: leg {leg.leg} not started, Job(s) {', '.join(alive)} still running"
                )
            await self._wait_for_wake((leg.namespace, alive[0]), min(2.0, max(0.05, deadline - time.monotonic())))

    async def _carry_out(self, namespace: str, job: dict[str, Any], verdict: LegVerdict) -> None:
        patch: dict[str, Any] = {}
        if verdict.halt and job.get("spec", {}).get("parallelism") != 0:
            patch["spec"] = {"parallelism": 0}
        annotations = job["metadata"].get("annotations") or {}
        termination = verdict.observation.termination
        if verdict.record and termination is not None and ANNOTATION_TERMINATION not in annotations:
            patch["metadata"] = {"annotations": {ANNOTATION_TERMINATION: json.dumps(termination.model_dump())}}
        if patch:
            await self._patch_job(namespace, job["metadata"]["name"], patch)

    async def _lost_leg_limits(self, leg: LegSpec, pods: list[dict[str, Any]]) -> LostLegLimits:
        """The leg pod's Node (a gang's: each started pod's), read when the last read is older than
        node_read_max_age allows, and when its progress last moved."""
        retries = leg.spec.retries
        limits = LostLegLimits(node_lost_after_s=retries.node_lost_after_seconds)
        started = [p for p in pods if p.get("status", {}).get("phase") in ("Running", "Unknown")]
        if not started:
            return limits
        max_age_s = node_read_max_age(retries.node_lost_after_seconds)
        pod = min(started, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
        node = await self._node(pod.get("spec", {}).get("nodeName") or "", max_age_s)
        progress_at = None
        if self.volume_root is not None:
            layout = volume.RunLayout.for_run(self.volume_root, leg.namespace, leg.name)
            progress = await asyncio.to_thread(volume.load_progress, layout)
            if progress is not None:
                await self._tell_world_size_change(leg, progress.message)
            pod_started = parse_time(pod.get("status", {}).get("startTime")) or 0.0
            progress_at = max(pod_started, (progress.updated_at or 0.0) if progress is not None else 0.0) or None
        nodes: dict[str, dict[str, Any] | None] = {}
        if leg.spec.resources.nodes > 1:  # a gang: every started pod's own node
            for name in sorted({p.get("spec", {}).get("nodeName") or "" for p in started} - {""}):
                nodes[name] = await self._node(name, max_age_s)
        return LostLegLimits(
            node=node,
            node_lost_after_s=retries.node_lost_after_seconds,
            progress_at=progress_at,
            progress_stall_s=retries.progress_stall_seconds,
            nodes=nodes,
        )

    async def _tell_world_size_change(self, leg: LegSpec, message: str) -> None:
        """One Event WorldSizeChanged on the TrainingRun when the leg's trainer reports that it resumed on another
        world size than its checkpoint's (data-parallel legs, issue 14): once per leg, across controller restarts
        (an Event already posted with the same message is found first)."""
        change = world_size_change(message)
        key = (leg.namespace, job_name(leg.name, leg.leg))
        if change is None or key in self._world_told or not leg.owner_uid:
            return
        text = f"leg {leg.leg}: {change}"
        selector = f"involvedObject.uid={leg.owner_uid},reason=WorldSizeChanged"
        posted = await self.call(self._core.list_namespaced_event, leg.namespace, field_selector=selector)
        if not any(event.message == text for event in posted.items):
            body = event_manifest(
                KIND,
                leg.namespace,
                leg.name,
                leg.owner_uid,
                event_type="Normal",
                reason="WorldSizeChanged",
                message=text,
            )
            await self.call(self._core.create_namespaced_event, leg.namespace, body)
            log.info("leg %s/%s: %s", leg.namespace, leg.name, text)
        self._world_told.add(key)

    async def _node(self, name: str, max_age_s: float) -> dict[str, Any] | None:
        """The Node `name` as read at most `max_age_s` ago (None when unnamed, gone or not readable: the pod-phase
        and progress checks remain). Legs that ask while a read is in flight share it: many legs judged at once
        on one node made one request each."""
        if not name:
            return None
        cached = self._nodes.get(name)
        if cached is not None and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        read = self._node_reads.get(name)
        if read is None:
            read = self._node_reads[name] = asyncio.ensure_future(self._read_node(name))
            read.add_done_callback(lambda done: self._forget_node_read(name, done))
        return await asyncio.shield(read)  # a cancelled caller leaves the read to the others

    def _forget_node_read(self, name: str, done: asyncio.Future[dict[str, Any] | None]) -> None:
        if self._node_reads.get(name) is done:
            del self._node_reads[name]
        if not done.cancelled():
            done.exception()  # retrieved here too: the waiters got it, or were cancelled and nobody did

    async def _read_node(self, name: str) -> dict[str, Any] | None:
        try:
            found = self._api_client.sanitize_for_serialization(await self.call(self._core.read_node, name))
        except ApiException as exc:
            if exc.status not in (403, 404):
                raise
            if exc.status == 403 and name not in self._nodes:
                log.warning("node %s: not readable (RBAC: nodes get); lost nodes are noticed by pod phase only", name)
            found = None
        self._nodes[name] = (time.monotonic(), found)
        return found  # type: ignore[no-any-return]

    async def _force_delete_leg(
        self, namespace: str, job: dict[str, Any], pods: list[dict[str, Any]], verdict: LegVerdict
    ) -> None:
        """A lost leg: its pods and Job deleted with grace 0, so the next leg may start. The kubelet of a partitioned
        node may never hear of it and its trainer may carry on; the next leg's fence stops its commits."""
        name = job["metadata"]["name"]
        termination = verdict.observation.termination
        log.warning(
            "Job %s/%s: %s; deleting it with grace 0", namespace, name, termination.message if termination else ""
        )
        for pod in pods:
            await self._delete_pod(namespace, pod["metadata"]["name"], 0)
        try:
            await self.call(
                self._batch.delete_namespaced_job,
                name,
                namespace,
                grace_period_seconds=0,
                propagation_policy="Background",
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def _patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        try:
            await self.call(self._batch.patch_namespaced_job, name, namespace, patch)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def _delete_pod(self, namespace: str, name: str, grace_s: float) -> None:
        try:
            await self.call(
                self._core.delete_namespaced_pod, name, namespace, body={"gracePeriodSeconds": max(0, int(grace_s))}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
