"""Data-parallel legs in the controller (issue 14): resources.processes (or gpus > 1) puts `--processes N` in the
one leg command both backends run, the Job of such a leg runs it with its GPUs and /dev/shm, and a process count that
is not one per GPU is refused naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from controller.kubernetes.jobs import build_leg_job, trainer_command
from controller.leg_model import LegSpec
from controller.spec import TrainingRunSpec


def leg(**resources: Any) -> LegSpec:
    return LegSpec(
        namespace="ml",
        name="bert",
        leg=2,
        run_path="runs/ml/bert",
        snapshot_path="snapshots/abc",
        spec=TrainingRunSpec.model_validate({"dataset": {"source": "demo"}, "resources": resources}),
    )


def test_one_process_leg_command_is_unchanged() -> None:
    args = leg().trainer_args("/v")
    assert "--processes" not in args and args[-2:] == ["--generation", "2"]
    assert leg(gpus=1).trainer_args("/v") == args


def test_processes_and_gpus_make_a_torchrun_leg() -> None:
    assert leg(processes=2).trainer_args("/v")[-2:] == ["--processes", "2"]
    assert leg(gpus=8).trainer_args("/v")[-2:] == ["--processes", "8"]  # one process per GPU by default
    uneven = leg(processes=4, allowUnevenAccumulation=True).trainer_args("/v")
    assert uneven[-3:] == ["--processes", "4", "--allow-uneven-accumulation"]
    command = trainer_command(leg(processes=2))
    assert command[:4] == ["python", "-m", "trainer", "train"] and command[-2:] == ["--processes", "2"]


def test_data_parallel_job_runs_the_leg_command_with_shared_memory() -> None:
    pod = build_leg_job(leg(gpus=2))["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][-2:] == ["--processes", "2"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]  # NCCL/gloo need /dev/shm
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_processes_other_than_one_per_gpu_are_refused() -> None:
    with pytest.raises(ValidationError, match="processes: 3 differs from gpus 2"):
        leg(gpus=2, processes=3)
    with pytest.raises(ValidationError, match="processes"):
        leg(processes=0)


def test_a_leg_that_lost_a_rank_counts_as_a_preemption() -> None:
    from controller.leg_model import LegOutcomeKind, LegTermination, classify_termination
    from trainer.launch import LOST_RANK_EXIT

    assert classify_termination(LegTermination(exit_code=LOST_RANK_EXIT)) == LegOutcomeKind.PREEMPTED
    assert classify_termination(LegTermination(exit_code=128 + 15)) == LegOutcomeKind.PREEMPTED  # stopped starting
