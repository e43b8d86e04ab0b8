"""Attack tier, issue 11 "Metrics and health bind 0.0.0.0 with no flag to change it": `relay controller` now has
`--metrics-bind-address` and `--health-bind-address` (default 0.0.0.0, unchanged: the kubelet probes the pod IP
and Prometheus scrapes it), and the observability server binds each endpoint where it is told."""

from __future__ import annotations

import urllib.request

import pytest

from controller.kubernetes.main import build_parser
from controller.observability import start_observability_server


def test_bind_address_flags_default_to_every_interface_and_take_an_address() -> None:
    defaults = build_parser().parse_args([])
    assert (defaults.metrics_bind_address, defaults.health_bind_address) == ("0.0.0.0", "0.0.0.0")
    args = build_parser().parse_args(["--metrics-bind-address", "127.0.0.1", "--health-bind-address", "::1"])
    assert (args.metrics_bind_address, args.health_bind_address) == ("127.0.0.1", "::1")


def test_each_endpoint_listens_where_it_is_told() -> None:
    server = start_observability_server(0, 0, host="127.0.0.1", metrics_host="127.0.0.2")
    try:
        with urllib.request.urlopen(f"http://127.0.0.2:{server.metrics_port}/metrics", timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{server.health_port}/healthz", timeout=5) as response:
            assert response.status == 200
        with pytest.raises(OSError):  # /metrics is not on the health address
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)
    finally:
        server.close()


def test_a_bad_policy_flag_is_refused_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--policy", '{"priorityClases": []}'])
    assert exited.value.code == 2
    assert "argument --policy: --policy: priorityClases" in capsys.readouterr().err
