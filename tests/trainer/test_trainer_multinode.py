"""Multi-node legs (issue 14, item 2) on loopback: two `python -m trainer train --nnodes 2 --rdzv-endpoint ...`
supervisors, one process each (gloo, the tiny model), stand in for the two pods of an Indexed Job (each with its
JOB_COMPLETION_INDEX) and meet by c10d rendezvous: world size 2 across two "nodes". A SIGTERM to one supervisor (a
pod deleted) stops both at one step, rank 0 saves one checkpoint and both exit 75; the run resumed on two nodes ends
bit-identical to an uninterrupted 2-process single-node leg (the same global batch). A bad rendezvous argument is
invalid input naming it."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest
from trainer_helpers import REPO, sha256, train_command, trainer_env, write_config

from trainer.volume import ExitCode, RunLayout, list_checkpoint_dirs, read_checkpoint, read_progress

# As tests/trainer/test_trainer_ddp.py: 160 rows / batch 8, 2 ranks x accumulation 1: global batch 16, 20 steps.
SETTINGS = {"epochs": 2, "checkpointEverySteps": 4, "keepLast": 3}
SLOW = {"RELAY_TEST_STEP_SLEEP_S": "0.25"}  # time to signal mid-run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Node:
    """One "pod": a supervisor process with its JOB_COMPLETION_INDEX, its output in a file."""

    def __init__(self, index: int, command: list[str], env: dict[str, str], out: Path) -> None:
        self.out = out
        with open(out, "w") as handle:
            self.process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                env=trainer_env(JOB_COMPLETION_INDEX=str(index), **env),
            )  # fmt: skip

    def wait(self, timeout: float = 120) -> int:
        return self.process.wait(timeout=timeout)

    @property
    def text(self) -> str:
        return self.out.read_text(encoding="utf-8")


def start_gang(run_dir: Path, snapshot: Path, config: Path, folder: Path, **env: str) -> list[Node]:
    endpoint = f"127.0.0.1:{free_port()}"
    command = [*train_command(run_dir, snapshot, config), "--processes", "1", "--nnodes", "2"]
    command += ["--rdzv-endpoint", endpoint, "--generation", "0"]
    folder.mkdir(parents=True, exist_ok=True)
    return [Node(index, command, env, folder / f"node-{index}.log") for index in (0, 1)]


def wait_for_step(run_dir: Path, step: int, nodes: list[Node], timeout: float = 90) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = read_progress(RunLayout(run_dir)) or {}
        if progress.get("state") == "running" and progress.get("step", 0) >= step:
            return
        for node in nodes:
            assert node.process.poll() is None, node.text[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_two_node_gang_preempted_on_one_node_resumes_bit_identical(snapshot: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.json", **SETTINGS)
    reference = tmp_path / "reference"
    single = subprocess.run(
        [*train_command(reference, snapshot, config), "--processes", "2"],
        capture_output=True, text=True, env=trainer_env(), timeout=180, cwd=REPO,
    )  # fmt: skip
    assert single.returncode == ExitCode.COMPLETE, single.stderr[-3000:]

    run_dir = tmp_path / "run"
    gang = start_gang(run_dir, snapshot, config, tmp_path / "leg-0", **SLOW)
    wait_for_step(run_dir, 6, gang)
    gang[1].process.send_signal(signal.SIGTERM)  # node 1's pod deleted: node 0 learns it through the all-reduce
    codes = [node.wait() for node in gang]
    assert codes == [ExitCode.PREEMPTED, ExitCode.PREEMPTED], [node.text[-2000:] for node in gang]
    progress = read_progress(RunLayout(run_dir))
    assert progress is not None and progress["state"] == "preempted"
    stopped_at = int(progress["step"])
    checkpoints = list_checkpoint_dirs(RunLayout(run_dir).checkpoints_dir)
    newest = read_checkpoint(checkpoints[-1][1], verify_hashes=True)
    assert newest.step == stopped_at and newest.extra["emergency"] is True  # one save, at the agreed step
    assert [step for step, _ in checkpoints].count(stopped_at) == 1
    assert newest.extra["world_size"] == 2 and newest.extra["global_micro_batches"] == 2
    assert "node 1 of 2, 1 process(es) each, c10d rendezvous at 127.0.0.1:" in gang[1].text

    resumed = start_gang(run_dir, snapshot, config, tmp_path / "leg-1")
    codes = [node.wait() for node in resumed]
    assert codes == [ExitCode.COMPLETE, ExitCode.COMPLETE], [node.text[-2000:] for node in resumed]
    assert f"start: resumed from checkpoint step {stopped_at}" in resumed[0].text + resumed[1].text
    final = RunLayout(run_dir).final_dir / "model.safetensors"
    assert sha256(final) == sha256(RunLayout(reference).final_dir / "model.safetensors")


@pytest.mark.parametrize(
    ("extra", "env", "reason"),
    [
        ([], {}, "--rdzv-endpoint: required with --nnodes 2"),
        (["--rdzv-endpoint", "node-0"], {}, "--rdzv-endpoint: 'node-0' is not host:port"),
        (["--rdzv-endpoint", "node-0:29400"], {"JOB_COMPLETION_INDEX": "2"}, "JOB_COMPLETION_INDEX: '2' is not"),
    ],
)
def test_a_bad_rendezvous_is_invalid_input_naming_it(
    snapshot: Path, tmp_path: Path, extra: list[str], env: dict[str, str], reason: str
) -> None:
    config = write_config(tmp_path / "config.json")
    termination = tmp_path / "termination"
    command = [*train_command(tmp_path / "run", snapshot, config), "--nnodes", "2", *extra]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, timeout=60,
        env=trainer_env(RELAY_TERMINATION_LOG=str(termination), **env),
    )  # fmt: skip
    assert result.returncode == ExitCode.INVALID_INPUT, result.stderr[-2000:]
    assert termination.read_text(encoding="utf-8").startswith(reason)
    assert not (tmp_path / "run" / "checkpoints").exists()
