"""The controller's health and metrics endpoints, exercised over real HTTP as kubelet probes and Prometheus would."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.observability import MetricsStatusSink, ObservabilityServer, RelayMetrics, start_observability_server
from controller.status import CheckpointStatus, LegStatus, Phase, RunEvent, RunStatus


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, content_type, body = _get(port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000_000.0)


@pytest.fixture
def server(clock: FakeClock) -> Iterator[ObservabilityServer]:
    with start_observability_server(0, 0, host="127.0.0.1", metrics=RelayMetrics(clock=clock)) as handle:
        yield handle


def test_liveness_is_ok_and_readiness_follows_set_ready(server: ObservabilityServer) -> None:
    assert server.health_port != server.metrics_port
    assert _get(server.health_port, "/healthz")[0] == 200
    status, _, body = _get(server.health_port, "/readyz")
    assert (status, body) == (503, "not ready: starting\n")

    server.set_ready(True)
    assert _get(server.health_port, "/readyz")[:3:2] == (200, "ok\n")

    server.set_ready(False, "temporal unreachable at temporal:7233")
    status, _, body = _get(server.health_port, "/readyz")
    assert (status, body) == (503, "not ready: temporal unreachable at temporal:7233\n")


def test_each_port_serves_only_its_own_paths(server: ObservabilityServer) -> None:
    assert _get(server.health_port, "/metrics")[0] == 404
    assert _get(server.metrics_port, "/healthz")[0] == 404
    assert _get(server.health_port, "/nope")[0] == 404


def test_one_shared_port_serves_all_three_paths() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with start_observability_server(port, port, host="127.0.0.1") as handle:
        assert handle.health_port == handle.metrics_port == port
        handle.set_ready(True)
        assert [_get(port, p)[0] for p in ("/healthz", "/readyz", "/metrics")] == [200, 200, 200]


def test_liveness_fails_when_the_event_loop_stops_beating() -> None:
    with start_observability_server(0, 0, host="127.0.0.1", liveness_timeout_s=0.2) as handle:
        handle.beat()
        assert _get(handle.health_port, "/healthz")[0] == 200
        handle._state.last_beat -= 5  # as if the loop had been silent for 5 s
        status, _, body = _get(handle.health_port, "/healthz")
        assert status == 503
        assert body.startswith("event loop silent for 5s")
        handle.beat()
        assert _get(handle.health_port, "/healthz")[0] == 200


def test_metrics_report_runs_legs_preemptions_failures_checkpoint_age_and_recovery(
    server: ObservabilityServer, clock: FakeClock
) -> None:
    metrics = server.metrics
    metrics.set_run_phase("team-a", "bert-1", "Running")
    metrics.set_run_phase("team-a", "bert-2", "Running")
    metrics.set_run_phase("team-a", "bert-3", "Pending")
    metrics.set_run_phase("team-b", "bert-1", "Succeeded")
    for _ in range(3):
        metrics.leg_started("team-a")
    metrics.preempted("team-a")
    metrics.preempted("team-a")
    metrics.failed("team-b")
    metrics.recovered("team-a", 42.0)
    metrics.set_latest_checkpoint("team-a", "bert-1", clock.now - 90)
    clock.now += 30

    samples = _samples(server.metrics_port)
    assert samples[("relay_trainingruns", (("namespace", "team-a"), ("phase", "Running")))] == 2
    assert samples[("relay_trainingruns", (("namespace", "team-a"), ("phase", "Pending")))] == 1
    assert samples[("relay_trainingruns", (("namespace", "team-b"), ("phase", "Succeeded")))] == 1
    assert samples[("relay_legs_started_total", (("namespace", "team-a"),))] == 3
    assert samples[("relay_preemptions_total", (("namespace", "team-a"),))] == 2
    assert samples[("relay_failures_total", (("namespace", "team-b"),))] == 1
    assert samples[("relay_checkpoint_age_seconds", (("name", "bert-1"), ("namespace", "team-a")))] == 120
    assert samples[("relay_time_to_recover_seconds_count", (("namespace", "team-a"),))] == 1
    assert samples[("relay_time_to_recover_seconds_sum", (("namespace", "team-a"),))] == 42
    assert samples[("relay_time_to_recover_seconds_bucket", (("le", "30.0"), ("namespace", "team-a")))] == 0
    assert samples[("relay_time_to_recover_seconds_bucket", (("le", "60.0"), ("namespace", "team-a")))] == 1


def test_a_phase_change_moves_the_run_and_forgetting_drops_its_series(server: ObservabilityServer) -> None:
    metrics = server.metrics
    metrics.set_run_phase("ns", "run", "Running")
    metrics.set_latest_checkpoint("ns", "run", 0.0)
    metrics.set_run_phase("ns", "run", "Succeeded")
    samples = _samples(server.metrics_port)
    assert ("relay_trainingruns", (("namespace", "ns"), ("phase", "Running"))) not in samples
    assert samples[("relay_trainingruns", (("namespace", "ns"), ("phase", "Succeeded")))] == 1

    metrics.forget_run("ns", "run")
    names = {name for name, _ in _samples(server.metrics_port)}
    assert "relay_trainingruns" not in names
    assert "relay_checkpoint_age_seconds" not in names


def test_bad_arguments_are_refused_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="health_port must be between 0 and 65535, got 70000"):
        start_observability_server(70000, 0)
    with pytest.raises(ValueError, match="liveness_timeout_s must be positive"):
        start_observability_server(0, 0, liveness_timeout_s=0)
    with pytest.raises(ValueError, match="recovery time must not be negative"):
        RelayMetrics().recovered("ns", -1.0)


def test_a_taken_port_fails_with_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve health/metrics on 127.0.0.1 ports {port}/0"):
            start_observability_server(port, 0, host="127.0.0.1")


# ------------------------------------------------------------------ metrics derived from the published status


class RecordingSink:
    def __init__(self) -> None:
        self.published: list[tuple[str, str, str, list[str]]] = []

    async def publish(self, namespace: str, name: str, status: RunStatus, events: list[RunEvent]) -> None:
        self.published.append((namespace, name, str(status.phase), [e.reason for e in events]))


def _status(phase: Phase, legs: list[LegStatus], checkpoint_at: str | None = None) -> RunStatus:
    checkpoint = CheckpointStatus(step=10, path="runs/ns/r/checkpoints/step-000000010", created_at=checkpoint_at)
    return RunStatus(phase=phase, legs=legs, latest_checkpoint=checkpoint if checkpoint_at else None)


def _leg(n: int, started: str, ended: str | None = None, outcome: str | None = None) -> LegStatus:
    return LegStatus(leg=n, started_at=started, ended_at=ended, outcome=outcome)  # type: ignore[arg-type]


def _counts(metrics: RelayMetrics) -> dict[str, float]:
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
        if s.labels.get("namespace") == "ns" and not s.name.endswith("_created")
    }
    return {k: v for k, v in samples.items() if not k.endswith("_bucket")}


@pytest.mark.anyio
async def test_the_status_sink_wrapper_counts_legs_preemptions_failures_and_recovery_once() -> None:
    inner, metrics = RecordingSink(), RelayMetrics(clock=lambda: 2_000_000_100.0)
    sink = MetricsStatusSink(inner, metrics)
    t = "2033-05-18T03:33:{:02d}Z".format
    history = [
        _status(Phase.PENDING, []),
        _status(Phase.RUNNING, [_leg(0, t(0))]),
        _status(Phase.RUNNING, [_leg(0, t(0), t(10), "preempted")], checkpoint_at=t(9)),
        _status(Phase.RUNNING, [_leg(0, t(0), t(10), "preempted"), _leg(1, t(40))], checkpoint_at=t(9)),
        _status(Phase.RUNNING, [_leg(0, t(0), t(10), "preempted"), _leg(1, t(40), t(45), "failed"), _leg(2, t(50))]),
        _status(
            Phase.SUCCEEDED,
            [_leg(0, t(0), t(10), "preempted"), _leg(1, t(40), t(45), "failed"), _leg(2, t(50), t(59), "completed")],
            checkpoint_at=t(58),
        ),
    ]
    for status in history:
        for _ in range(2):  # a status published twice counts once
            await sink.publish("ns", "r", status, [RunEvent(reason="Whatever")])
    assert len(inner.published) == 12 and inner.published[-1] == ("ns", "r", "Succeeded", ["Whatever"])
    counts = _counts(metrics)
    assert counts["relay_legs_started_total"] == 3
    assert counts["relay_preemptions_total"] == 1
    assert counts["relay_failures_total"] == 1
    assert counts["relay_time_to_recover_seconds_count"] == 1
    assert counts["relay_time_to_recover_seconds_sum"] == 30  # preempted at :10, next leg running at :40
    assert counts["relay_trainingruns"] == 1
    assert datetime.fromisoformat(t(58)).timestamp() == 2_000_000_038
    assert counts["relay_checkpoint_age_seconds"] == 62  # now (2_000_000_100) minus the checkpoint's time

    sink.forget_run("ns", "r")
    assert "relay_trainingruns" not in _counts(metrics)


@pytest.mark.anyio
async def test_a_restarted_controller_counts_only_what_it_sees_happen() -> None:
    metrics = RelayMetrics()
    sink = MetricsStatusSink(RecordingSink(), metrics)
    t = "2033-05-18T03:33:{:02d}Z".format
    before = [_leg(0, t(0), t(10), "preempted"), _leg(1, t(20))]
    await sink.publish("ns", "r", _status(Phase.RUNNING, before), [])
    assert "relay_legs_started_total" not in _counts(metrics)
    await sink.publish("ns", "r", _status(Phase.RUNNING, [*before[:1], _leg(1, t(20), t(30), "preempted")]), [])
    after = [before[0], _leg(1, t(20), t(30), "preempted"), _leg(2, t(35))]
    await sink.publish("ns", "r", _status(Phase.RUNNING, after), [])
    counts = _counts(metrics)
    assert counts["relay_legs_started_total"] == 1
    assert counts["relay_preemptions_total"] == 1
    assert counts["relay_time_to_recover_seconds_sum"] == 5
