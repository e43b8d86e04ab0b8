"""Leader election over a coordination.k8s.io/v1 Lease: which controller replica runs the TrainingRun handlers.

Every replica runs the Temporal worker; only the holder of the Lease runs kopf's handlers. The protocol is
client-go's (`leaderelection`): a candidate takes the Lease when it is absent, released (no holder) or expired,
and the holder renews it every `retry_period_s`, from a thread of its own. Expiry is judged on this process's own
clock, from the moment it last saw the Lease's record change, never from the `renewTime` written by another machine
(no clock skew).
A holder that cannot renew within `renew_deadline_s` has lost the Lease; it must stop handling at once.
Writes are optimistic (`resourceVersion`), so of two candidates racing for an expired Lease exactly one wins.

A Lease rather than kopf's peering: peering needs kopf's own cluster-wide KopfPeering CRDs installed, while a
Lease is built into every cluster since 1.14, is what `kubectl get lease` and platform teams already watch, and
needs only get/create/update on leases in the release namespace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from controller.waiting import wait_event

log = logging.getLogger("relay.controller.leader")

# client-go's defaults are 15/10/2. A candidate sees the holder's last renewal up to one retry period late and
# notices expiry up to one retry period late, so failover is about lease + 1 retry period + kopf's start (~1 s):
# 15 s gave a median above the 15 s failover target; 10 s meets it and still rides out 4 missed renewals.
LEASE_DURATION_S = 10.0
RENEW_DEADLINE_S = 7.0
RETRY_PERIOD_S = 2.0


class LeaderElectionError(ValueError):
    """The election's timings are inconsistent (names the setting at fault)."""


class LeadershipLost(RuntimeError):
    """This replica held the Lease and could not renew it in time: another replica may be the leader now."""


def default_identity() -> str:
    """The pod's name (RELAY_POD_NAME, else the hostname) plus a random suffix: two processes never share one."""
    return f"{os.environ.get('RELAY_POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _now_micro() -> str:
    """A MicroTime as the API server writes it (RFC 3339, microseconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaseElector:
    """Acquire, renew and release one Lease. `acquire` blocks; `hold` renews until stopped or lost."""

    api_client: kubernetes.client.ApiClient
    namespace: str
    name: str
    identity: str = field(default_factory=default_identity)
    lease_duration_s: float = LEASE_DURATION_S
    renew_deadline_s: float = RENEW_DEADLINE_S
    retry_period_s: float = RETRY_PERIOD_S
    _observed: tuple[Any, ...] | None = field(default=None, init=False)
    _observed_at: float = field(default=0.0, init=False)
    _last_renewed: float = field(default=0.0, init=False)
    _other_holder: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.lease_duration_s > self.renew_deadline_s:
            raise LeaderElectionError(
                f"lease duration ({self.lease_duration_s} s) must exceed the renew deadline ({self.renew_deadline_s} s)"
            )
        if not self.renew_deadline_s > self.retry_period_s > 0:
            raise LeaderElectionError(
                f"renew deadline ({self.renew_deadline_s} s) must exceed the retry period ({self.retry_period_s} s) > 0"
            )
        self.coordination = kubernetes.client.CoordinationV1Api(self.api_client)

    # ------------------------------------------------------------------ one attempt

    def _body(self, lease: Any | None, acquiring: bool) -> Any:  # a V1Lease as a dict
        now = _now_micro()
        transitions = 0
        acquire_time = now
        if lease is not None and lease.spec is not None:
            transitions = lease.spec.lease_transitions or 0
            if acquiring:
                transitions += 1
            elif lease.spec.acquire_time is not None:
                acquire_time = lease.spec.acquire_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.lease_duration_s)),
                "acquireTime": acquire_time,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }
        if lease is not None:
            body["metadata"]["resourceVersion"] = lease.metadata.resource_version
        return body

    def try_acquire_or_renew(self, deadline: float | None = None) -> bool:
        """One round of client-go's tryAcquireOrRenew; True when this replica holds the Lease afterwards.

        Its requests may take until `deadline` (time.monotonic(); default one retry period from now): a holder gives
        them the time left before its renew deadline, as client-go does, so that an API server slow to answer
        (hundreds of runs finishing at once) does not cost it the Lease while it still has time. A renewal counts
        from when this round started, not from its answer: no later than the API server's write, which is where
        the other replicas' expiry clocks start.
        """
        started = time.monotonic()
        ends = deadline if deadline is not None else started + self.retry_period_s

        def timeout() -> float:
            return max(0.5, ends - time.monotonic())

        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace, _request_timeout=timeout())
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                self.coordination.create_namespaced_lease(
                    self.namespace, self._body(None, acquiring=True), _request_timeout=timeout()
                )
            except ApiException as create_exc:
                if create_exc.status == 409:  # another candidate created it first
                    return False
                raise
            self._last_renewed = started
            return True
        spec = lease.spec
        holder = spec.holder_identity if spec is not None else None
        self._other_holder = holder if holder and holder != self.identity else None
        record = (holder, spec.renew_time if spec else None, spec.lease_transitions if spec else None)
        now = time.monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = spec.lease_duration_seconds if spec and spec.lease_duration_seconds else self.lease_duration_s
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # held by a live replica
        try:
            self.coordination.replace_namespaced_lease(
                self.name,
                self.namespace,
                self._body(lease, acquiring=holder != self.identity),
                _request_timeout=timeout(),
            )
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote it between our read and write
                return False
            raise
        self._last_renewed = started
        return True

    async def _attempt(self) -> bool:
        try:
            return await asyncio.to_thread(self.try_acquire_or_renew)
        except Exception as exc:  # an unreachable API server is one failed round, not a crash
            log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            return False

    # ------------------------------------------------------------------ the loops

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica holds the Lease (True) or `stop` is set (False)."""
        log.info("lease %s/%s: %s is a candidate", self.namespace, self.name, self.identity)
        while not stop.is_set():
            if await self._attempt():
                log.info("lease %s/%s: %s is the leader", self.namespace, self.name, self.identity)
                return True
            await wait_event(stop, self.retry_period_s)
        return False

    async def hold(self, stop: asyncio.Event, lost: asyncio.Event) -> None:
        """Renew every retry period until `stop` is set; set `lost` and return once a renewal is overdue.

        The renewals run on a thread of their own, as client-go's do on their own goroutine: a controller whose
        event loop is busy (500 runs finishing at once) still renews on time. Renewing from the loop made such a
        leader miss its deadline and leave. Only the verdict, "lost", comes back to the loop.
        """
        loop = asyncio.get_running_loop()
        done = threading.Event()
        renewer = threading.Thread(
            target=self._renew_until,
            args=(done, lambda: loop.call_soon_threadsafe(lost.set)),
            daemon=True,
            name=f"lease-{self.name}",
        )
        renewer.start()
        stopped = asyncio.ensure_future(stop.wait())
        left = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({stopped, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.set()
            stopped.cancel()
            left.cancel()
            await asyncio.to_thread(renewer.join)

    def _renew_until(self, done: threading.Event, on_lost: Callable[[], None]) -> None:
        """The renewing thread: one try every retry period until `done`; calls `on_lost` once renewal is overdue."""
        while not done.wait(self.retry_period_s):
            started = time.monotonic()
            try:
                renewed = self.try_acquire_or_renew(deadline=self._last_renewed + self.renew_deadline_s)
            except Exception as exc:  # an unreachable API server is one failed round, not a crash
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                renewed = False
            took = time.monotonic() - started
            if took > self.retry_period_s:  # the warning before a loss: an API server (or this process) this slow
                log.warning(
                    "lease %s/%s: a renewal took %.1f s (%s; renew deadline %.0f s)",
                    self.namespace,
                    self.name,
                    took,
                    "renewed" if renewed else "not renewed",
                    self.renew_deadline_s,
                )
            if renewed:
                continue
            # Give up when the next try would start past the renew deadline (a try's requests end by the deadline,
            # 7 s after the last renewal began with the defaults, before the 10 s Lease can expire for the others),
            # and at once when another replica holds the Lease.
            overdue = time.monotonic() - self._last_renewed + self.retry_period_s > self.renew_deadline_s
            if overdue or self._other_holder:
                log.error(
                    "lease %s/%s: %s could not renew within %.0f s (holder now: %s); leadership lost",
                    self.namespace,
                    self.name,
                    self.identity,
                    self.renew_deadline_s,
                    self._other_holder or "none",
                )
                on_lost()
                return

    def release(self) -> None:
        """Hand the Lease back (no holder, 1 s) so another replica takes over at its next retry, not after expiry."""
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace, _request_timeout=5)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            body = self._body(lease, acquiring=False)
            body["spec"].update({"holderIdentity": None, "leaseDurationSeconds": 1})
            self.coordination.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=5)
            log.info("lease %s/%s: released by %s", self.namespace, self.name, self.identity)
        except Exception as exc:  # the Lease expires on its own
            log.warning("lease %s/%s: could not release it: %s", self.namespace, self.name, exc)
