"""The `relay` CLI as a user runs it (a subprocess): bad input is one line naming the problem, exit non-zero,
nothing started; `relay run` starts and stops its embedded Temporal server, shows progress, prints a summary."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from controller.devserver import reachable

REPO = Path(__file__).resolve().parents[2]


def relay(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write(path: Path, spec: str, name: str = "cli-run") -> Path:
    path.write_text(
        f"apiVersion: relay.dev/v1alpha1\nkind: TrainingRun\nmetadata:\n  name: {name}\nspec:\n"
        + textwrap.indent(textwrap.dedent(spec), "  ")
    )
    return path


TINY = """\
model: tiny
dataset: {source: demo, maxRows: 300}
training: {maxSteps: 120, batchSize: 8, maxSeqLength: 32, checkpointEverySteps: 20, logEverySteps: 1}
resources: {cpu: "1"}
"""


def _no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


def test_validate_names_every_bad_field(tmp_path: Path):
    bad = _write(tmp_path / "bad.yaml", "dataset: {source: ftp}\ntraining: {batchSize: 0}\nbogus: 1\n", name="Bad_Name")
    result = relay("validate", str(bad))
    assert result.returncode == 2
    for field in ("metadata.name", "spec.dataset.source", "spec.training.batchSize", "spec.bogus"):
        assert field in result.stderr
    _no_traceback(result)
    good = subprocess.run(  # `python -m controller` is the same command
        [sys.executable, "-m", "controller", "validate", str(_write(tmp_path / "good.yaml", TINY))],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert good.returncode == 0 and "valid TrainingRun default/cli-run" in good.stdout


@pytest.mark.parametrize(
    ("spec", "extra", "code", "message"),
    [
        ("dataset: {source: demo}\nresources: {gpus: -1}\n", [], 2, "spec.resources.gpus"),
        ("dataset: {source: csv, path: ../outside.csv}\n", [], 2, "spec.dataset.path: must not contain '..'"),
        (
            "dataset: {source: csv, path: data/missing.csv}\n",
            [],
            2,
            "spec.dataset.path 'data/missing.csv': no such file",
        ),
        (TINY, ["--preempt-at-step", "0"], 2, "--preempt-at-step: must be a positive step number"),
        (TINY, ["--address", "nohostport"], 2, "--address 'nohostport': expected host:port"),
    ],
)
def test_run_rejects_bad_input_and_starts_nothing(tmp_path: Path, spec: str, extra: list[str], code: int, message: str):
    volume = tmp_path / "volume"
    port = _free_port()
    file = _write(tmp_path / "run.yaml", spec)
    result = relay("run", str(file), "--volume", str(volume), "--address", f"127.0.0.1:{port}", *extra)
    if "--address" in extra:
        result = relay("run", str(file), "--volume", str(volume), *extra)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    _no_traceback(result)
    assert not (volume / "temporal.db").exists() and not (volume / "snapshots").exists()
    assert not reachable(f"127.0.0.1:{port}")


def test_run_with_a_volume_that_cannot_be_written(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = relay("run", str(_write(tmp_path / "run.yaml", TINY)), "--volume", str(blocker / "volume"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"relay: volume {blocker / 'volume'}: not writable")
    _no_traceback(result)


@pytest.mark.parametrize("command", [["status", "x"], ["pause", "x"], ["resume", "x"], ["worker"]])
def test_unreachable_temporal_is_one_line(tmp_path: Path, command: list[str]):
    address = f"127.0.0.1:{_free_port()}"
    volume = ["--volume", str(tmp_path)] if command[0] in ("status", "worker") else []
    result = relay(*command, "--address", address, *volume)
    assert result.returncode == 1
    expected = f"relay: cannot reach Temporal at {address} (is the server running? `relay run` starts one)"
    assert result.stderr.strip() == expected


@pytest.mark.slow
def test_relay_run_end_to_end_with_the_embedded_server(tmp_path: Path):
    volume = tmp_path / "volume"
    address = f"127.0.0.1:{_free_port()}"
    file = _write(tmp_path / "run.yaml", TINY)
    result = relay(
        "run", str(file), "--volume", str(volume), "--address", address, "--preempt-at-step", "30", timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _no_traceback(result)
    assert (
        f"temporal workflow query --address {address} --workflow-id trainingrun-default.cli-run --name get_status"
        in result.stderr
    )
    assert "started the embedded Temporal dev server" in result.stderr
    assert "step 120/120" in result.stderr  # the progress line reached the end
    out = result.stdout
    assert "Succeeded: finished" in out
    assert "leg 0: steps 0 -> " in out and "preempted" in out and "injected preemption at step 30" in out
    assert "leg 1: steps " in out and "completed" in out
    assert "preemptions 1, failures 0" in out and "held-out metrics: accuracy" in out
    model_line = next(line for line in out.splitlines() if line.strip().startswith("model: "))
    assert Path(model_line.split("model: ", 1)[1]).joinpath("model.safetensors").is_file()
    assert (volume / "temporal.db").is_file()
    assert not reachable(address)  # the embedded server was stopped with relay
    # Each leg's trainer output stays on the volume (legs/<n>.log): `relay logs` prints the newest leg's, or one.
    logs = relay("logs", "cli-run", "--volume", str(volume))
    assert logs.returncode == 0 and "step 120/120" in logs.stdout, logs.stderr
    first = relay("logs", "cli-run", "--volume", str(volume), "--leg", "0")
    assert first.returncode == 0 and "step 30/120" in first.stdout and "step 120/120" not in first.stdout
    # The workflow's history lives on in the volume's temporal.db: `relay status` serves it again.
    status = relay("status", "cli-run", "--volume", str(volume), "--address", address, "--json")
    assert status.returncode == 0, status.stderr
    assert '"phase": "Succeeded"' in status.stdout and '"preemptions": 1' in status.stdout
    # BertInferenceWorkflow: predictions from the run's final model, through the trainer's predict command.
    texts = ["a moving and funny film", "a dull, tedious mess"]
    predicted = relay(
        "predict", "cli-run", "--volume", str(volume), "--address", address, *[f"--text={t}" for t in texts]
    )
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == texts
    assert all(line.split("\t")[0] in ("0", "1") for line in lines)
    missing = relay("predict", "no-such-run", "--volume", str(volume), "--address", address, "--text", "x")
    assert missing.returncode == 1 and "no such model folder" in missing.stderr
    _no_traceback(missing)
    assert not reachable(address)


def _relay_run_training(tmp_path: Path, name: str) -> tuple[subprocess.Popen[str], Path, str, Path]:
    """`relay run` of a 600-step tiny run, returned once its leg has trained 20 steps: (process, volume, address,
    file). SIGINT is in its default disposition, as from a terminal: a test session started in the background by
    a shell without job control inherits SIGINT ignored, and so would `relay run` (the interrupt never landed)."""
    volume = tmp_path / "volume"
    address = f"127.0.0.1:{_free_port()}"
    file = _write(tmp_path / "run.yaml", TINY.replace("maxSteps: 120", "maxSteps: 600"), name=name)
    command = [sys.executable, "-m", "controller.cli", "run", str(file), "--volume", str(volume), "--address", address]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    progress = volume / f"runs/default/{name}/progress.json"
    deadline = time.monotonic() + 120
    while not (
        progress.exists() and '"step": ' in progress.read_text() and json.loads(progress.read_text())["step"] >= 20
    ):
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    return process, volume, address, file


def _stopped_with_a_checkpoint(process: subprocess.Popen[str], volume: Path, address: str, name: str) -> None:
    """The interrupted `relay run` stopped its leg (exit 75: it checkpointed) and its dev server, and ended."""
    process.wait(timeout=120)
    leg = volume / f"runs/default/{name}/legs/0"
    assert json.loads(leg.with_suffix(".exit.json").read_text())["exit_code"] == 75
    trainer_pid = json.loads(leg.with_suffix(".trainer.json").read_text())["pid"]
    assert not Path(f"/proc/{trainer_pid}").exists() or "zombie" in Path(f"/proc/{trainer_pid}/status").read_text()
    assert not reachable(address), "the embedded dev server outlived relay run"


def _said_interrupted(process: subprocess.Popen[str]) -> str:
    _, stderr = process.communicate(timeout=120)
    assert "interrupted: stopping the running leg (it checkpoints); `relay run` again resumes" in stderr
    assert "Traceback" not in stderr and "never retrieved" not in stderr, stderr[-2000:]
    return stderr


@pytest.mark.slow
def test_interrupted_relay_run_resumes_when_run_again(tmp_path: Path):
    process, volume, address, file = _relay_run_training(tmp_path, "ctrl-c")
    process.send_signal(signal.SIGINT)  # Ctrl-C
    stderr = _said_interrupted(process)
    _stopped_with_a_checkpoint(process, volume, address, "ctrl-c")
    assert process.returncode == 130, stderr[-2000:]
    again = relay("run", str(file), "--volume", str(volume), "--address", address, "--no-progress", timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Succeeded: finished" in again.stdout
    legs = [line.split() for line in again.stdout.splitlines() if line.strip().startswith("leg ")]
    assert legs[0][1:3] == ["0:", "steps"] and legs[0][6] == "preempted"
    assert int(legs[1][3]) >= 20 and legs[1][6] == "completed"  # leg 1 resumed from leg 0's checkpoint


@pytest.mark.slow
def test_a_killed_relay_run_stops_like_ctrl_c_and_orphans_nothing(tmp_path: Path):
    """`kill` or a supervisor's stop: the leg checkpoints and stops, the dev server goes with relay run (before,
    both kept running, in sessions of their own), and the exit code is the shell's 128 + 15."""
    process, volume, address, _ = _relay_run_training(tmp_path, "killed")
    process.send_signal(signal.SIGTERM)
    stderr = _said_interrupted(process)
    _stopped_with_a_checkpoint(process, volume, address, "killed")
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]


@pytest.mark.slow
def test_a_relay_run_whose_terminal_hangs_up_stops_like_ctrl_c_and_orphans_nothing(tmp_path: Path):
    """A closed terminal or a dropped ssh session: the output goes away (writes fail) and SIGHUP follows. The
    progress bar's failed writes must not end relay run before it stops its leg and its dev server."""
    process, volume, address, _ = _relay_run_training(tmp_path, "hung-up")
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    process.stderr.close()
    time.sleep(1.5)  # a progress redraw or two into the closed pipe first, as into a terminal that went away
    process.send_signal(signal.SIGHUP)
    _stopped_with_a_checkpoint(process, volume, address, "hung-up")
    assert process.returncode == 128 + signal.SIGHUP


def test_run_against_an_unreachable_remote_server_starts_nothing(tmp_path: Path):
    address = f"127.0.0.2:{_free_port()}"  # not a local name: no embedded server is started for it
    volume = tmp_path / "volume"
    result = relay("run", str(_write(tmp_path / "run.yaml", TINY)), "--volume", str(volume), "--address", address)
    assert result.returncode == 1
    expected = f"relay: cannot reach Temporal at {address} (the embedded server is started only for a local address)"
    assert result.stderr.strip() == expected
    assert not (volume / "temporal.db").exists()


def test_a_dev_server_that_cannot_start_is_reported_with_its_own_reason(tmp_path: Path):
    """The embedded server's last log line says why it exited: here its history file is a folder."""
    volume = tmp_path / "volume"
    (volume / "temporal.db").mkdir(parents=True)
    address = f"127.0.0.1:{_free_port()}"
    result = relay("run", str(_write(tmp_path / "run.yaml", TINY)), "--volume", str(volume), "--address", address)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("relay: temporal dev server exited with code"), line
    assert "unable to open database file" in line and str(volume / "temporal-server.log") in line, line
    assert not reachable(address)
