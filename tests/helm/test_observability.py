"""The controller's health and metrics endpoints, exercised over real HTTP as kubelet probes and Prometheus would."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.observability import ObservabilityServer, RelayMetrics, start_observability_server


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
