"""Multi-node legs (issue 14, item 2): resources.nodes makes the world nodes x processes per node, the leg command
carries `--processes <per node> --nnodes M`, and the local backend (one machine) refuses it naming the field."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from controller.backends.base import RunIdentityMismatch
from controller.backends.local import LocalBackend
from controller.leg_model import LegSpec
from controller.spec import TrainingRunSpec

REPO = Path(__file__).resolve().parents[2]


def leg(leg_number: int = 3, **resources: Any) -> LegSpec:
    return LegSpec(
        namespace="ml",
        name="bert",
        leg=leg_number,
        run_path="runs/ml/bert",
        snapshot_path="snapshots/abc",
        spec=TrainingRunSpec.model_validate({"dataset": {"source": "demo"}, "resources": resources}),
    )


def test_world_size_is_nodes_times_processes_per_node() -> None:
    resources = leg(nodes=2, gpus=8).spec.resources
    assert (resources.nodes, resources.processes_per_node, resources.world_size) == (2, 8, 16)
    assert leg().spec.resources.nodes == 1 and leg().spec.resources.world_size == 1
    assert leg(nodes=3).spec.resources.world_size == 3  # one process on each of 3 nodes


def test_leg_command_names_processes_per_node_and_nodes() -> None:
    assert leg(nodes=2, processes=2).trainer_args("/v")[-4:] == ["--processes", "2", "--nnodes", "2"]
    assert leg(nodes=2).trainer_args("/v")[-4:] == ["--processes", "1", "--nnodes", "2"]
    assert "--nnodes" not in leg(processes=2).trainer_args("/v")


@pytest.mark.parametrize("nodes", [0, -1, 65])
def test_a_node_count_out_of_range_is_refused_naming_the_field(nodes: int) -> None:
    with pytest.raises(ValidationError, match=r"resources\.nodes"):
        leg(nodes=nodes)


def test_local_backend_refuses_a_multi_node_leg(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    with pytest.raises(RunIdentityMismatch, match=r"spec.resources.nodes: 2 nodes need the Kubernetes backend"):
        asyncio.run(backend.launch(leg(nodes=2)))
    assert not (tmp_path / "runs").exists()  # nothing started, no leg files


def test_relay_run_refuses_a_multi_node_run_before_starting_anything(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text(
        "apiVersion: relay.dev/v1alpha1\nkind: TrainingRun\nmetadata:\n  name: mn\nspec:\n"
        + textwrap.indent("model: tiny\ndataset: {source: demo}\nresources: {nodes: 2}\n", "  ")
    )
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", "run", str(file), "--volume", str(tmp_path / "volume")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "spec.resources.nodes: 2 nodes need the Kubernetes backend" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "volume" / "temporal.db").exists()
