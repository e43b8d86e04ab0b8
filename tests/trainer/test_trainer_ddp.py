"""Data-parallel legs (issue 14) on CPU with gloo over loopback: `python -m trainer train --processes 2` runs two
ranks through torchrun. A SIGTERM to one rank stops both at one step, saves once and exits 75; resumed at the same
world size the final weights are bit-identical to an uninterrupted 2-process run; 2 -> 1 -> 2 processes keep the
global batch and the sample order and end within WORLD_CHANGE_TOLERANCE; a SIGKILLed rank ends the leg as a
preemption-like loss (137) and the run resumes from the newest complete checkpoint; a world size that cannot keep
the global batch is refused naming the field."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import REPO, run_train, sha256, start_train, train_command, trainer_env, write_config

from trainer.distributed import World, accumulation_for
from trainer.errors import InvalidInput
from trainer.volume import ExitCode, RunLayout, list_checkpoint_dirs, read_checkpoint, read_progress

# 160 rows / batch 8 = 20 micro-batches per epoch; 2 ranks x accumulation 1 = 2 micro-batches a step: 10 steps per
# epoch, 20 in all. One process resuming this run accumulates 2 micro-batches per step: the same global batch.
DDP_SETTINGS = {"epochs": 2, "checkpointEverySteps": 4, "keepLast": 3}
TOTAL_STEPS = 20
SLOW = {"RELAY_TEST_STEP_SLEEP_S": "0.25"}  # time to signal mid-run
# Measured: max |w_resumed - w_uninterrupted| after 2 -> 1 -> 2 processes was 0 on this tiny model (two micro-batches
# a step sum alike on one process and through gloo); with dropout drawn per rank instead of per micro-batch it was
# 0.023. More ranks may sum in another order: the stated tolerance (README):
WORLD_CHANGE_TOLERANCE = 1e-5


def ddp_command(run_dir: Path, snapshot: Path, config: Path, processes: int, *extra: str) -> list[str]:
    return [*train_command(run_dir, snapshot, config), "--processes", str(processes), *extra]


def run_ddp(
    run_dir: Path, snapshot: Path, config: Path, processes: int = 2, *extra: str, **env: str
) -> subprocess.CompletedProcess[str]:
    command = ddp_command(run_dir, snapshot, config, processes, *extra)
    return subprocess.run(command, capture_output=True, text=True, env=trainer_env(**env), timeout=180, cwd=REPO)


def start_ddp(run_dir: Path, snapshot: Path, config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    command = ddp_command(run_dir, snapshot, config, 2)
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=trainer_env(**env), cwd=REPO
    )


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def rank_pid(supervisor: int, rank: int) -> int:
    """The pid of rank `rank` among the supervisor's descendants (torchrun's workers), from its RANK variable."""
    pending = [supervisor]
    while pending:
        pid = pending.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            environ = []
        if f"RANK={rank}".encode() in environ and b"RELAY_DDP_RESULTS" in b"\0".join(environ):
            return pid
        pending += _children(pid)
    raise AssertionError(f"no rank {rank} under pid {supervisor}")


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen[str], timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = read_progress(RunLayout(run_dir)) or {}
        if progress.get("state") == "running" and progress.get("step", 0) >= step:
            return int(progress["step"])
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def newest_checkpoint(run_dir: Path) -> Path:
    return list_checkpoint_dirs(RunLayout(run_dir).checkpoints_dir)[-1][1]


def final_weights(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(RunLayout(run_dir).final_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, snapshot: Path) -> Path:
    """An uninterrupted 2-process run: the reference."""
    folder = tmp_path_factory.mktemp("ddp-uninterrupted")
    config = write_config(folder / "config.json", **DDP_SETTINGS)
    result = run_ddp(folder / "run", snapshot, config)
    assert result.returncode == ExitCode.COMPLETE, result.stderr[-3000:]
    assert "data-parallel: 2 process(es), 1 micro-batch(es) of 8 each per step: global batch 16" in result.stderr
    return folder / "run"


def test_sigterm_to_one_rank_stops_both_and_resumes_bit_identical(
    uninterrupted: Path, snapshot: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.json", **DDP_SETTINGS)
    run_dir = tmp_path / "run"
    leg = start_ddp(run_dir, snapshot, config, SLOW)
    wait_for_step(run_dir, 6, leg)
    os.kill(rank_pid(leg.pid, 1), signal.SIGTERM)  # one rank only: rank 0 learns it through the all-reduce
    _, stderr = leg.communicate(timeout=90)
    assert leg.returncode == ExitCode.PREEMPTED, stderr[-3000:]
    progress = read_progress(RunLayout(run_dir))
    assert progress is not None and progress["state"] == "preempted"
    stopped_at = int(progress["step"])
    assert "SIGTERM (to another rank) received; finished step" in stderr  # rank 0's line: stopped by its peer
    saved = read_checkpoint(newest_checkpoint(run_dir), verify_hashes=True)
    assert saved.step == stopped_at and saved.extra["emergency"] is True  # one checkpoint, at the agreed step
    assert {"rng.json", "rng.rank-1.json"} <= {entry.path for entry in saved.files}  # every rank's RNG
    assert saved.extra["world_size"] == 2 and saved.extra["global_micro_batches"] == 2

    resumed = run_ddp(run_dir, snapshot, config)
    assert resumed.returncode == ExitCode.COMPLETE, resumed.stderr[-3000:]
    assert f"start: resumed from checkpoint step {stopped_at}" in resumed.stderr
    final = RunLayout(run_dir).final_dir / "model.safetensors"
    assert sha256(final) == sha256(RunLayout(uninterrupted).final_dir / "model.safetensors")


def test_two_one_two_processes_keep_the_global_batch_within_tolerance(
    uninterrupted: Path, snapshot: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.json", **DDP_SETTINGS)
    run_dir = tmp_path / "run"
    first = start_ddp(run_dir, snapshot, config, SLOW)
    wait_for_step(run_dir, 4, first)
    first.send_signal(signal.SIGTERM)  # to the leg (its supervisor): every rank gets it
    _, stderr = first.communicate(timeout=90)
    assert first.returncode == ExitCode.PREEMPTED, stderr[-3000:]
    step_a = read_checkpoint(newest_checkpoint(run_dir), verify_hashes=True).step

    second = start_train(run_dir, snapshot, config, **SLOW)  # one process
    wait_for_step(run_dir, step_a + 3, second)
    second.send_signal(signal.SIGTERM)
    _, stderr = second.communicate(timeout=90)
    assert second.returncode == ExitCode.PREEMPTED, stderr[-3000:]
    assert f"world size changed 2 -> 1 since checkpoint step {step_a}" in stderr
    assert "1 process(es), 2 micro-batch(es) of 8 each per step: global batch 16 kept" in stderr
    middle = read_checkpoint(newest_checkpoint(run_dir), verify_hashes=True)
    assert middle.extra["world_size"] == 1 and middle.extra["global_micro_batches"] == 2
    assert middle.extra["total_steps"] == TOTAL_STEPS  # the same steps, so the same samples in each

    third = run_ddp(run_dir, snapshot, config)
    assert third.returncode == ExitCode.COMPLETE, third.stderr[-3000:]
    assert f"world size changed 1 -> 2 since checkpoint step {middle.step}" in third.stderr
    ours, reference = final_weights(run_dir), final_weights(uninterrupted)
    difference = max(float((ours[k] - reference[k]).abs().max()) for k in reference)
    print(f"2 -> 1 -> 2 max abs difference of final weights: {difference:.3g}")
    assert difference <= WORLD_CHANGE_TOLERANCE


def test_sigkill_of_one_rank_ends_the_leg_and_the_run_resumes(
    uninterrupted: Path, snapshot: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.json", **DDP_SETTINGS)
    run_dir = tmp_path / "run"
    leg = start_ddp(run_dir, snapshot, config, SLOW)
    wait_for_step(run_dir, 6, leg)
    os.kill(rank_pid(leg.pid, 1), signal.SIGKILL)
    _, stderr = leg.communicate(timeout=90)
    assert leg.returncode == 128 + signal.SIGKILL, stderr[-3000:]  # classified like a killed leg: preemption-like
    assert "rank 1 of 2 ended without a word (killed" in stderr
    newest = read_checkpoint(newest_checkpoint(run_dir), verify_hashes=True).step
    assert newest >= 4

    resumed = run_ddp(run_dir, snapshot, config)
    assert resumed.returncode == ExitCode.COMPLETE, resumed.stderr[-3000:]
    assert f"start: resumed from checkpoint step {newest}" in resumed.stderr
    final = RunLayout(run_dir).final_dir / "model.safetensors"
    assert sha256(final) == sha256(RunLayout(uninterrupted).final_dir / "model.safetensors")


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused(snapshot: Path, tmp_path: Path) -> None:
    # One process, accumulation 3: 3 micro-batches a step. Two processes cannot split them evenly.
    config = write_config(tmp_path / "config.json", maxSteps=4, gradientAccumulationSteps=3)
    run_dir = tmp_path / "run"
    first = run_train(run_dir, snapshot, config, RELAY_TEST_SIGTERM_DURING_STEP="2")
    assert first.returncode == ExitCode.PREEMPTED, first.stderr[-3000:]
    termination = tmp_path / "termination"
    refused = run_ddp(run_dir, snapshot, config, RELAY_TERMINATION_LOG=str(termination))
    assert refused.returncode == ExitCode.INVALID_INPUT, refused.stderr[-3000:]
    reason = termination.read_text(encoding="utf-8")
    assert reason.startswith("resources.processes: 2 processes cannot keep this run's global batch of 3")
    assert "gradientAccumulationSteps" in reason and "resources.allowUnevenAccumulation" in reason
    assert read_progress(RunLayout(run_dir))["state"] == "invalid"  # type: ignore[index]


def test_uneven_accumulation_is_allowed_only_when_asked() -> None:
    with pytest.raises(InvalidInput, match=r"resources\.processes: 4 processes"):
        accumulation_for(6, World(0, 4), allow_uneven=False, made_by=2)
    assert accumulation_for(6, World(0, 4), allow_uneven=True, made_by=2) == 2
    assert accumulation_for(6, World(1, 3), allow_uneven=False, made_by=2) == 2


def test_leg_outcome_is_rank_zeros_word_or_a_lost_rank(tmp_path: Path) -> None:
    from trainer.launch import LOST_RANK_EXIT, leg_outcome

    (tmp_path / "rank-0.json").write_text(json.dumps({"exit_code": 65, "message": "resources.processes: ..."}))
    code, message = leg_outcome(tmp_path, 2)
    assert (code, "rank 1 of 2 ended without a word" in message) == (LOST_RANK_EXIT, True)
    assert leg_outcome(tmp_path, 2, signalled=True)[0] == 128 + signal.SIGTERM  # stopped while starting
    (tmp_path / "rank-1.json").write_text(json.dumps({"exit_code": 1, "message": "RuntimeError: peer gone"}))
    assert leg_outcome(tmp_path, 2) == (65, "resources.processes: ...")  # rank 0 speaks for the leg
