"""Kill-and-resume: a run SIGKILLed at random steps (once inside a checkpoint write, once from outside at a
random instant) and SIGTERMed once, restarted with the same arguments each time, ends bit-identical to an
uninterrupted run: same sha256 of the final weights, same final metrics."""

from __future__ import annotations

import json
import random
import re
import signal
import time
from pathlib import Path

import pytest
from trainer_helpers import run_train, sha256, start_train, write_config

from trainer.volume import ExitCode, RunLayout, list_checkpoint_dirs, read_checkpoint, read_progress

# 160 rows / batch 8 = 20 micro-batches; accumulation 2 -> 10 optimizer steps per epoch, 3 epochs = 30 steps.
RESUME_SETTINGS = {"epochs": 3, "gradientAccumulationSteps": 2, "checkpointEverySteps": 4, "keepLast": 2}
TOTAL_STEPS = 30
SEED = 20261129  # the random kill points derive from it; printed on failure via the assertion messages
COMPARED_METRICS = ("accuracy", "f1_macro", "loss", "train_loss", "steps", "epochs")
# Every interrupted leg copies its checkpoints' tensors slowly (on the writer thread, while the next step's
# forward/backward run): each checkpoint must still hold exactly its own step's state.
SLOW_COPY = {"RELAY_TEST_CHECKPOINT_COPY_DELAY_S": "0.05"}


def newest_step(run_dir: Path) -> int | None:
    found = list_checkpoint_dirs(RunLayout(run_dir).checkpoints_dir)
    return found[-1][0] if found else None


def started_from(stderr: str) -> int | None:
    """The step the leg's start line says it resumed from (None for a fresh start)."""
    if "start: fresh run" in stderr:
        return None
    match = re.search(r"start: resumed from checkpoint step (\d+)", stderr)
    assert match, f"no start line in the log:\n{stderr}"
    return int(match.group(1))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, snapshot: Path) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(folder / "config.json", **RESUME_SETTINGS)
    result = run_train(folder / "run", snapshot, config)
    assert result.returncode == ExitCode.COMPLETE, result.stderr
    return folder / "run"


def test_killed_and_resumed_run_ends_bit_identical(uninterrupted: Path, snapshot: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    config = write_config(tmp_path / "config.json", **RESUME_SETTINGS)
    run_dir = tmp_path / "run"
    legs: list[str] = []

    # Leg 1: SIGKILL right after a random early step.
    kill_1 = rng.randint(2, 7)
    leg = run_train(run_dir, snapshot, config, RELAY_TEST_KILL_AFTER_STEP=str(kill_1), **SLOW_COPY)
    assert leg.returncode == -signal.SIGKILL, leg.stderr
    assert started_from(leg.stderr) is None
    legs.append(f"SIGKILL after step {kill_1}")

    # Leg 2: SIGKILL inside the write of the next checkpoint, after its first file, before its manifest.
    resume = newest_step(run_dir)
    in_write = ((resume or 0) // 4 + 2) * 4
    leg = run_train(run_dir, snapshot, config, RELAY_TEST_KILL_IN_CHECKPOINT_WRITE=str(in_write), **SLOW_COPY)
    assert leg.returncode == -signal.SIGKILL, leg.stderr
    assert started_from(leg.stderr) == resume, legs
    assert any(p.name.startswith(".tmp-step-") for p in RunLayout(run_dir).checkpoints_dir.iterdir())
    assert newest_step(run_dir) == in_write - 4, "the half-written checkpoint must not count as one"
    legs.append(f"SIGKILL inside the write of step {in_write}")

    # Leg 3: SIGKILL from outside at a random instant while it trains (steps slowed to 30 ms).
    resume = newest_step(run_dir)
    process = start_train(run_dir, snapshot, config, RELAY_TEST_STEP_SLEEP_S="0.03", **SLOW_COPY)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        progress = read_progress(RunLayout(run_dir)) or {}
        if progress.get("pid") == process.pid and progress.get("state") in ("running", "checkpointing"):
            break
        time.sleep(0.05)
    time.sleep(rng.uniform(0.05, 0.5))
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert started_from(stderr) == resume
    legs.append("SIGKILL from outside at a random instant")

    # Leg 4: SIGKILL after another random step, beyond the resume point.
    resume = newest_step(run_dir) or 0
    kill_4 = rng.randint(resume + 1, min(resume + 8, TOTAL_STEPS - 6))
    leg = run_train(run_dir, snapshot, config, RELAY_TEST_KILL_AFTER_STEP=str(kill_4), **SLOW_COPY)
    assert leg.returncode == -signal.SIGKILL, leg.stderr
    assert started_from(leg.stderr) == resume
    legs.append(f"SIGKILL after step {kill_4}")

    # Leg 5: SIGTERM lands in the middle of a step: the step is finished and saved, exit 75.
    resume = newest_step(run_dir) or 0
    term_step = rng.randint(resume + 1, TOTAL_STEPS - 1)
    leg = run_train(run_dir, snapshot, config, RELAY_TEST_SIGTERM_DURING_STEP=str(term_step), **SLOW_COPY)
    assert leg.returncode == ExitCode.PREEMPTED, leg.stderr
    assert started_from(leg.stderr) == resume
    assert newest_step(run_dir) == term_step, "the emergency checkpoint holds the step that was under way"
    assert f"finished step {term_step} and saved checkpoint step {term_step}" in leg.stderr
    assert read_progress(RunLayout(run_dir))["state"] == "preempted"
    legs.append(f"SIGTERM during step {term_step}")

    # Leg 6: carries on to the end.
    leg = run_train(run_dir, snapshot, config, **SLOW_COPY)
    assert leg.returncode == ExitCode.COMPLETE, leg.stderr
    assert started_from(leg.stderr) == term_step

    final, reference = RunLayout(run_dir).final_dir, RunLayout(uninterrupted).final_dir
    assert sha256(final / "model.safetensors") == sha256(reference / "model.safetensors"), legs
    metrics = json.loads((final / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert {k: metrics[k] for k in COMPARED_METRICS} == {k: expected[k] for k in COMPARED_METRICS}, legs
    assert metrics["steps"] == TOTAL_STEPS
    assert read_checkpoint(final, verify_hashes=True).step == TOTAL_STEPS


def test_sigterm_from_outside_loses_no_completed_step(snapshot: Path, tmp_path: Path) -> None:
    """A SIGTERM at a random moment: the saved checkpoint holds every step the log reported as done."""
    config = write_config(
        tmp_path / "config.json", **{**RESUME_SETTINGS, "logEverySteps": 1, "checkpointEverySteps": 1000}
    )
    run_dir = tmp_path / "run"
    process = start_train(run_dir, snapshot, config, RELAY_TEST_STEP_SLEEP_S="0.05")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (read_progress(RunLayout(run_dir)) or {}).get("step", 0) < 3:
        time.sleep(0.02)
    time.sleep(random.Random(SEED).uniform(0.0, 0.2))
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == ExitCode.PREEMPTED, stderr
    assert time.monotonic() - sent < 25, "exit within the grace budget"
    logged = [int(m) for m in re.findall(r"INFO step (\d+)/", stderr)]
    assert logged, stderr
    saved = newest_step(run_dir)
    assert saved == max(logged), f"log reported step {max(logged)} done, checkpoint holds {saved}"
    info = read_checkpoint(RunLayout(run_dir).checkpoints_dir / f"step-{saved:09d}", verify_hashes=True)
    assert info.extra["emergency"] is True
    assert "preempted: SIGTERM received" in stderr
