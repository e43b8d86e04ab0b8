"""The run's AdamW implementation (trainer.optimizer): fused on CPU for a fresh run, kept across a resume, so a
stopped and resumed run ends bit-identical to an uninterrupted one; checkpoints from before fused AdamW (torch's
default implementation) keep resuming, with the implementation they were made with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_helpers import sha256, write_config

import trainer.optimizer
from trainer.errors import InvalidInput
from trainer.faults import Faults
from trainer.optimizer import build_adamw, fastest_implementation, implementation_of
from trainer.train import run_leg
from trainer.volume import ExitCode, RunLayout, list_checkpoint_dirs, read_checkpoint, write_manifest

# 160 rows / batch 8 = 20 steps per epoch, 2 epochs; checkpoints every 6 steps, SIGTERM inside step 9.
SETTINGS = {"epochs": 2, "checkpointEverySteps": 6}
STOP_STEP = 9


def final_sha(run_dir: Path) -> str:
    return sha256(RunLayout(run_dir).final_dir / "model.safetensors")


def stopped_then_resumed(run_dir: Path, snapshot: Path, config: Path) -> None:
    stopped = run_leg(run_dir, snapshot, config, faults=Faults(sigterm_during_step=STOP_STEP))
    assert stopped.exit_code == ExitCode.PREEMPTED, stopped.message
    resumed = run_leg(run_dir, snapshot, config, faults=Faults())
    assert resumed.exit_code == ExitCode.COMPLETE, resumed.message
    assert resumed.stats.start_step == STOP_STEP


def checkpoint_optimizer(folder: Path) -> tuple[str, str]:
    """(the implementation the manifest records, the one optimizer.json's param groups name)."""
    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    return read_checkpoint(folder, verify_hashes=True).extra["optimizer"], implementation_of(groups)


def test_a_fresh_run_takes_the_fastest_implementation_the_device_has() -> None:
    weights = [torch.nn.Parameter(torch.zeros(2, 2))]
    assert fastest_implementation(torch.device("cpu"), weights) == "fused"
    assert fastest_implementation(torch.device("cpu"), [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]) in (
        "foreach",
        "default",
    )
    optimizer = build_adamw([{"params": weights}], lr=1e-3, device=torch.device("cpu"), implementation=None)
    assert implementation_of(optimizer.param_groups) == "fused"
    assert implementation_of([{"fused": None, "foreach": None}]) == "default"  # what older checkpoints hold
    assert implementation_of([{"fused": False, "foreach": True}]) == "foreach"


def test_a_fused_checkpoint_is_refused_where_fused_adamw_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer.optimizer, "fastest_implementation", lambda device, params: "foreach")
    weights = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(InvalidInput, match="optimizer: the checkpoint was made with fused AdamW"):
        build_adamw([{"params": weights}], lr=1e-3, device=torch.device("cpu"), implementation="fused")


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_run_stopped_and_resumed_ends_bit_identical(snapshot: Path, tmp_path: Path, threads: int) -> None:
    config = write_config(tmp_path / "config.json", **SETTINGS, torchThreads=threads)
    assert run_leg(tmp_path / "whole", snapshot, config, faults=Faults()).exit_code == ExitCode.COMPLETE
    stopped_then_resumed(tmp_path / "legs", snapshot, config)
    assert final_sha(tmp_path / "legs") == final_sha(tmp_path / "whole")
    for _, folder in list_checkpoint_dirs(RunLayout(tmp_path / "legs").checkpoints_dir):
        assert checkpoint_optimizer(folder) == ("fused", "fused")


def make_old(folder: Path) -> None:
    """Rewrite a checkpoint as the trainer wrote it before trainer.optimizer: no `optimizer` field anywhere."""
    info = read_checkpoint(folder, verify_hashes=False)
    state = json.loads((folder / "trainer_state.json").read_text())
    del state["optimizer"]
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    extra = {k: v for k, v in info.extra.items() if k != "optimizer"}
    (folder / "manifest.json").unlink()
    write_manifest(
        folder, step=info.step, epoch=info.epoch, config_hash=info.config_hash, metrics=info.metrics, extra=extra
    )


def test_checkpoint_from_before_fused_adamw_resumes_bit_identical_with_its_own_implementation(
    snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "config.json", **SETTINGS)
    with monkeypatch.context() as old_trainer:  # the trainer before fused AdamW: torch's default implementation
        old_trainer.setattr(trainer.optimizer, "fastest_implementation", lambda device, params: "default")
        assert run_leg(tmp_path / "whole", snapshot, config, faults=Faults()).exit_code == ExitCode.COMPLETE
        stopped = run_leg(tmp_path / "legs", snapshot, config, faults=Faults(sigterm_during_step=STOP_STEP))
        assert stopped.exit_code == ExitCode.PREEMPTED, stopped.message
    checkpoints = RunLayout(tmp_path / "legs").checkpoints_dir
    for _, folder in list_checkpoint_dirs(checkpoints):
        make_old(folder)
        assert read_checkpoint(folder, verify_hashes=True).extra.get("optimizer") is None

    resumed = run_leg(tmp_path / "legs", snapshot, config, faults=Faults())  # today's trainer: fused for new runs
    assert resumed.exit_code == ExitCode.COMPLETE, resumed.message
    assert resumed.stats.start_step == STOP_STEP
    assert final_sha(tmp_path / "legs") == final_sha(tmp_path / "whole")
    newest = list_checkpoint_dirs(checkpoints)[-1][1]
    assert checkpoint_optimizer(newest) == ("default", "default"), "the resumed leg kept the run's implementation"
