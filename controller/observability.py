"""The controller's health and Prometheus metrics HTTP endpoints, and the metrics it records.

`start_observability_server(health_port, metrics_port)` serves, each from a daemon thread:

- `/healthz` (liveness): 200 while the process answers; with `liveness_timeout_s`, 503 once the
  operator's event loop has not called `beat()` for that long (a wedged loop gets restarted).
- `/readyz` (readiness): 503 until the operator calls `set_ready(True)` (connected to the API server
  and to Temporal); `set_ready(False, "why")` takes it out again, the reason in the body.
- `/metrics` (Prometheus text format) from the handle's `RelayMetrics`:

  ==========================================  =========  ==========================================
  relay_trainingruns                          gauge      runs by `namespace`, `phase`
  relay_legs_started_total                    counter    legs launched, by `namespace`
  relay_preemptions_total                     counter    legs lost to the infrastructure
  relay_failures_total                        counter    legs failed by the run's own fault
  relay_checkpoint_age_seconds                gauge      now minus the newest verified checkpoint's
                                                         time, per run (`namespace`, `name`)
  relay_time_to_recover_seconds               histogram  preemption seen -> next leg running
  relay_trainingrun_step                      gauge      the run's training step (`namespace`, `name`);
                                                         steps/s is its deriv()
  ==========================================  =========  ==========================================

Health and metrics may share a port (then one server answers all three paths). Port 0 binds a free
port; the handle's `health_port`/`metrics_port` tell which. Nothing here touches Kubernetes or Temporal.

`MetricsStatusSink(sink, metrics)` wraps the operator's status sink and derives the run metrics from the
RunStatus the workflow publishes (phase, legs with outcomes and times, newest checkpoint), so the metrics
say what `.status` says. Legs a restarted controller finds already started or ended are its baseline,
not counted again. `RunEventLog(sink)` makes each run event the workflow publishes (a leg launched, ended,
preempted or resumed; the run finished) one INFO line of the controller's log (Warning events: WARNING), the
line `kubectl logs deploy/relay` shows beside the Event `kubectl describe` shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from controller.status import RunEvent, RunStatus

log = logging.getLogger("relay.events")

# Preemption to the next leg running: seconds for a local process, minutes for a spot node to come back.
RECOVERY_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)


class _RunStateCollector(Collector):
    """Gauges computed at scrape time from the runs the operator reported: phases and checkpoint ages."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}
        self._checkpoint_times: dict[tuple[str, str], float] = {}
        self._steps: dict[tuple[str, str], int] = {}

    def set_step(self, namespace: str, name: str, step: int) -> None:
        with self._lock:
            self._steps[(namespace, name)] = step

    def set_phase(self, namespace: str, name: str, phase: str) -> None:
        with self._lock:
            self._phases[(namespace, name)] = phase

    def set_checkpoint_time(self, namespace: str, name: str, created_at: float) -> None:
        with self._lock:
            self._checkpoint_times[(namespace, name)] = created_at

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)
            self._checkpoint_times.pop((namespace, name), None)
            self._steps.pop((namespace, name), None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            phases = dict(self._phases)
            checkpoint_times = dict(self._checkpoint_times)
            steps = dict(self._steps)
        now = self._clock()
        runs = GaugeMetricFamily(
            "relay_trainingruns", "TrainingRuns known to this controller, by phase.", labels=["namespace", "phase"]
        )
        counts: dict[tuple[str, str], int] = {}
        for (namespace, _name), phase in phases.items():
            counts[(namespace, phase)] = counts.get((namespace, phase), 0) + 1
        for (namespace, phase), count in sorted(counts.items()):
            runs.add_metric([namespace, phase], count)
        yield runs
        ages = GaugeMetricFamily(
            "relay_checkpoint_age_seconds",
            "Seconds since the newest verified checkpoint of each run was written.",
            labels=["namespace", "name"],
        )
        for (namespace, name), created_at in sorted(checkpoint_times.items()):
            ages.add_metric([namespace, name], max(0.0, now - created_at))
        yield ages
        step_gauge = GaugeMetricFamily(
            "relay_trainingrun_step",
            "Each run's training step (the Grafana dashboard's steps/s is its deriv()).",
            labels=["namespace", "name"],
        )
        for (namespace, name), step in sorted(steps.items()):
            step_gauge.add_metric([namespace, name], step)
        yield step_gauge


class RelayMetrics:
    """Everything the controller records for Prometheus, in a registry of its own (tests make many)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._runs = _RunStateCollector(clock)
        self.registry.register(self._runs)
        self._legs_started = Counter(
            "relay_legs_started", "Training legs launched.", ["namespace"], registry=self.registry
        )
        self._preemptions = Counter(
            "relay_preemptions",
            "Legs lost to the infrastructure (preemption, eviction, node loss).",
            ["namespace"],
            registry=self.registry,
        )
        self._failures = Counter(
            "relay_failures",
            "Legs that failed by the run's own fault (errors, stuck, invalid input).",
            ["namespace"],
            registry=self.registry,
        )
        self._time_to_recover = Histogram(
            "relay_time_to_recover_seconds",
            "Seconds from a preemption being seen to the next leg running.",
            ["namespace"],
            buckets=RECOVERY_BUCKETS,
            registry=self.registry,
        )

    def set_run_phase(self, namespace: str, name: str, phase: str) -> None:
        """The run's current phase (Pending, Running, Succeeded, ...); counted in `relay_trainingruns`."""
        self._runs.set_phase(namespace, name, phase)

    def set_latest_checkpoint(self, namespace: str, name: str, created_at: float) -> None:
        """Unix time the run's newest verified checkpoint was written; its age is computed at each scrape."""
        self._runs.set_checkpoint_time(namespace, name, created_at)

    def set_step(self, namespace: str, name: str, step: int) -> None:
        """The run's training step, as its status says; `relay_trainingrun_step`."""
        self._runs.set_step(namespace, name, step)

    def forget_run(self, namespace: str, name: str) -> None:
        """The TrainingRun was deleted: drop its phase, checkpoint age and step series."""
        self._runs.forget(namespace, name)

    def leg_started(self, namespace: str) -> None:
        self._legs_started.labels(namespace=namespace).inc()

    def preempted(self, namespace: str) -> None:
        self._preemptions.labels(namespace=namespace).inc()

    def failed(self, namespace: str) -> None:
        self._failures.labels(namespace=namespace).inc()

    def recovered(self, namespace: str, seconds: float) -> None:
        """A leg runs again `seconds` after the preemption of the previous one was seen."""
        if seconds < 0:
            raise ValueError(f"recovery time must not be negative, got {seconds}")
        self._time_to_recover.labels(namespace=namespace).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric, as `/metrics` serves it."""
        return generate_latest(self.registry)


class _StatusSink(Protocol):
    async def publish(self, namespace: str, name: str, status: RunStatus, events: list[RunEvent]) -> None: ...


def _unix_time(rfc3339: str | None) -> float | None:
    if not rfc3339:
        return None
    try:
        return datetime.fromisoformat(rfc3339).timestamp()
    except ValueError:
        return None


class MetricsStatusSink:
    """A status sink that records RelayMetrics from each published RunStatus, then hands it to `inner`."""

    _FAILURE_OUTCOMES = frozenset({"failed", "stuck", "invalid"})

    def __init__(self, inner: _StatusSink, metrics: RelayMetrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self._lock = threading.Lock()
        self._started: dict[tuple[str, str], set[int]] = {}  # legs whose start was seen, per run
        self._ended: dict[tuple[str, str], set[int]] = {}  # legs whose end was seen, per run

    def record(self, namespace: str, name: str, status: RunStatus) -> None:
        """Update the metrics from one published status (idempotent: a repeated status counts nothing twice)."""
        key = (namespace, name)
        self.metrics.set_run_phase(namespace, name, str(status.phase))
        self.metrics.set_step(namespace, name, status.step)
        checkpoint = status.latest_checkpoint
        created_at = _unix_time(checkpoint.created_at) if checkpoint is not None else None
        if created_at is not None:
            self.metrics.set_latest_checkpoint(namespace, name, created_at)
        with self._lock:
            first_sight = key not in self._started
            started = self._started.setdefault(key, set())
            ended = self._ended.setdefault(key, set())
            # A controller (re)starting mid-run counts nothing it did not see happen, except the first leg of a
            # run whose first published status already shows it running.
            legs = status.legs
            fresh_run = first_sight and len(legs) == 1 and legs[0].leg == 0 and legs[0].outcome is None
            counting = not first_sight or fresh_run
            preempted_at = {leg.leg: _unix_time(leg.ended_at) for leg in legs if leg.outcome == "preempted"}
            for leg in legs:
                if leg.leg not in started:
                    started.add(leg.leg)
                    if counting:
                        self.metrics.leg_started(namespace)
                        lost_at, began_at = preempted_at.get(leg.leg - 1), _unix_time(leg.started_at)
                        if lost_at is not None and began_at is not None:
                            self.metrics.recovered(namespace, max(0.0, began_at - lost_at))
                if leg.outcome is not None and leg.leg not in ended:
                    ended.add(leg.leg)
                    if not counting:
                        continue
                    if leg.outcome == "preempted":
                        self.metrics.preempted(namespace)
                    elif leg.outcome in self._FAILURE_OUTCOMES:
                        self.metrics.failed(namespace)

    def forget_run(self, namespace: str, name: str) -> None:
        """The TrainingRun was deleted: drop its series and bookkeeping."""
        with self._lock:
            self._started.pop((namespace, name), None)
            self._ended.pop((namespace, name), None)
        self.metrics.forget_run(namespace, name)

    async def publish(self, namespace: str, name: str, status: RunStatus, events: list[RunEvent]) -> None:
        self.record(namespace, name, status)
        await self.inner.publish(namespace, name, status, events)


class RunEventLog:
    """A status sink that logs each published run event as one line, then hands the status to `inner`:
    `ml/bert leg 2 Preempted: leg 2 preempted (...); resuming from checkpoint step 40`."""

    def __init__(self, inner: _StatusSink) -> None:
        self.inner = inner

    async def publish(self, namespace: str, name: str, status: RunStatus, events: list[RunEvent]) -> None:
        leg = status.legs[-1].leg if status.legs else None
        where = f"{namespace}/{name}" + (f" leg {leg}" if leg is not None else "")
        for event in events:
            level = logging.WARNING if event.type == "Warning" else logging.INFO
            log.log(level, "%s %s: %s", where, event.reason, event.message)
        await self.inner.publish(namespace, name, status, events)


class _State:
    """Readiness and liveness as set by the operator; read by the HTTP handler threads."""

    def __init__(self, liveness_timeout_s: float | None) -> None:
        self.lock = threading.Lock()
        self.ready = False
        self.not_ready_reason = "starting"
        self.liveness_timeout_s = liveness_timeout_s
        self.last_beat = time.monotonic()


def _handler_class(state: _State, metrics: RelayMetrics, paths: frozenset[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "relay-controller"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path not in paths:
                self._reply(404, b"not found\n")
            elif path == "/metrics":
                self._reply(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                with state.lock:
                    timeout, silent_for = state.liveness_timeout_s, time.monotonic() - state.last_beat
                if timeout is not None and silent_for > timeout:
                    self._reply(503, f"event loop silent for {silent_for:.0f}s (limit {timeout:.0f}s)\n".encode())
                else:
                    self._reply(200, b"ok\n")
            else:  # /readyz
                with state.lock:
                    ready, reason = state.ready, state.not_ready_reason
                self._reply(200, b"ok\n") if ready else self._reply(503, f"not ready: {reason}\n".encode())

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Probes every few seconds would flood `kubectl logs`; stay quiet."""

    return Handler


class ObservabilityServer:
    """The running endpoints; returned by `start_observability_server`. Close it (or use `with`) to stop."""

    def __init__(
        self,
        health_port: int,
        metrics_port: int,
        host: str,
        metrics: RelayMetrics,
        liveness_timeout_s: float | None,
        metrics_host: str | None = None,
    ) -> None:
        self.metrics = metrics
        self._state = _State(liveness_timeout_s)
        self._servers: list[ThreadingHTTPServer] = []
        try:
            metrics_host = metrics_host or host
            if health_port == metrics_port and health_port != 0 and metrics_host == host:
                self._serve(host, health_port, frozenset({"/healthz", "/readyz", "/metrics"}))
                self.health_port = self.metrics_port = self._servers[0].server_address[1]
            else:
                self._serve(host, health_port, frozenset({"/healthz", "/readyz"}))
                self._serve(metrics_host, metrics_port, frozenset({"/metrics"}))
                self.health_port = self._servers[0].server_address[1]
                self.metrics_port = self._servers[1].server_address[1]
        except OSError:
            self.close()
            raise

    def _serve(self, host: str, port: int, paths: frozenset[str]) -> None:
        server = ThreadingHTTPServer((host, port), _handler_class(self._state, self.metrics, paths))
        server.daemon_threads = True
        self._servers.append(server)
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"relay-http-{port}", daemon=True
        ).start()

    @property
    def ready(self) -> bool:
        with self._state.lock:
            return self._state.ready

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """Readiness for `/readyz`: True once connected to the API server and Temporal; False with a reason."""
        with self._state.lock:
            self._state.ready = ready
            self._state.not_ready_reason = reason or ("ready" if ready else "unspecified")

    def beat(self) -> None:
        """The operator's event loop is alive; call it more often than `liveness_timeout_s`."""
        with self._state.lock:
            self._state.last_beat = time.monotonic()

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> ObservabilityServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_observability_server(
    health_port: int,
    metrics_port: int,
    *,
    host: str = "0.0.0.0",
    metrics: RelayMetrics | None = None,
    liveness_timeout_s: float | None = None,
    metrics_host: str | None = None,
) -> ObservabilityServer:
    """Serve /healthz and /readyz on `host:health_port`, /metrics on `metrics_host:metrics_port` (default: `host`).

    Raises OSError (naming the address) when a port is taken.
    """
    for field, port in (("health_port", health_port), ("metrics_port", metrics_port)):
        if not 0 <= port <= 65535:
            raise ValueError(f"{field} must be between 0 and 65535, got {port}")
    if liveness_timeout_s is not None and liveness_timeout_s <= 0:
        raise ValueError(f"liveness_timeout_s must be positive, got {liveness_timeout_s}")
    try:
        return ObservabilityServer(
            health_port, metrics_port, host, metrics or RelayMetrics(), liveness_timeout_s, metrics_host
        )
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot serve health/metrics on {host} ports {health_port}/{metrics_port}: {exc.strerror}"
        ) from exc
