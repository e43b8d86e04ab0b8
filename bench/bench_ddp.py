"""Data-parallel legs (issue 14), 2 processes on CPU with gloo (`python -m trainer train --processes 2`):

- `ddp_checkpoint_stall_fraction`: checkpoint_stall_fraction's definition for a 2-process MiniLM leg: the median
  cost to training per checkpoint as rank 0's checkpoint line gives it (the training thread's wait + the extra
  time of the steps that overlapped the write), over one synchronous save of the same MiniLM checkpoint.
- `ddp_steps_lost_per_sigterm`: 2-process tiny legs SIGTERMed (to the leg) after a random step: steps the log
  reported done minus the step of the emergency checkpoint.
- `ddp_resume_world_size_change_max_abs_diff`: a tiny run preempted on 2 processes, resumed on 1, preempted,
  finished on 2, against an uninterrupted 2-process run: max abs difference of the final weights (tolerance
  1e-5, as tests/trainer/test_trainer_ddp.py asserts). Samples/s of 2 processes against 1 is in its method text
  for information only (this machine has 2 cores, shared).

`python -m bench.bench_ddp` prints the entries as JSON. About five minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_trainer import (
    MINILM,
    REPO,
    capture_bench_state,
    entry,
    minilm_training_state,
    rotten_tomatoes_snapshot,
    write_config,
)

TOLERANCE = 1e-5


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _command(run_dir: Path, snapshot: Path, config: Path, processes: int) -> list[str]:
    command = [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir), "--snapshot", str(snapshot)]
    return [*command, "--config", str(config), *(["--processes", str(processes)] if processes > 1 else [])]


def _run(run_dir: Path, snapshot: Path, config: Path, processes: int) -> tuple[str, float]:
    started = time.monotonic()
    result = subprocess.run(
        _command(run_dir, snapshot, config, processes), capture_output=True, text=True, env=_env(), cwd=REPO
    )
    if result.returncode != 0:
        raise RuntimeError(f"{processes}-process leg exit {result.returncode}\n{result.stderr[-2000:]}")
    return result.stderr, time.monotonic() - started


def _preempt_after(run_dir: Path, snapshot: Path, config: Path, processes: int, step: int) -> str:
    from trainer.volume import RunLayout, read_progress

    process = subprocess.Popen(
        _command(run_dir, snapshot, config, processes), stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (read_progress(RunLayout(run_dir)) or {}).get("step", 0) < step:
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    if process.returncode != 75:
        raise RuntimeError(f"SIGTERM at step {step}: exit {process.returncode}\n{stderr[-2000:]}")
    return stderr


def bench_stall(scratch: Path, snapshot: Path, out: dict[str, Any]) -> None:
    from trainer import checkpoint as ckpt

    model, optimizer, scheduler = minilm_training_state()
    saves = []
    for rep in range(3):
        state = capture_bench_state(model, optimizer, scheduler, rep + 1)
        started = time.perf_counter()
        ckpt.write_checkpoint(state, scratch / f"sync-{rep}")
        saves.append(time.perf_counter() - started)
    del model, optimizer, scheduler
    sync_save = statistics.median(saves)
    config = write_config(
        scratch / "config-stall.json", model=MINILM, maxSteps=60, checkpointEverySteps=15, torchThreads=1
    )
    stderr, seconds = _run(scratch / "stall", snapshot, config, 2)
    costs = [float(c) for c in re.findall(r"cost to training ([\d.]+)s", stderr)]
    if not costs:
        raise RuntimeError(f"no checkpoint cost lines in the 2-process leg's log\n{stderr[-2000:]}")
    cost = statistics.median(costs)
    out["ddp_checkpoint_stall_fraction"] = entry(
        cost / sync_save,
        "fraction",
        "<= 0.2",
        f"2-process MiniLM leg (gloo, 1 thread each, batch 16 per rank, 60 steps, a checkpoint every 15, "
        f"{seconds:.0f} s): median cost to training per checkpoint from rank 0's checkpoint lines {cost:.3f} s "
        f"(each: {', '.join(f'{c:.3f}' for c in costs)}) over one synchronous save of the same MiniLM checkpoint "
        f"{sync_save:.3f} s (median of {', '.join(f'{s:.3f}' for s in saves)})",
    )


def bench_sigterm(scratch: Path, snapshot: Path, out: dict[str, Any]) -> None:
    from trainer.volume import RunLayout, list_checkpoint_dirs

    rng = random.Random(14)
    lost = []
    for trial in range(3):
        config = write_config(
            scratch / f"config-term-{trial}.json",
            model="tiny",
            maxSteps=400,
            checkpointEverySteps=25,
            logEverySteps=1,
            torchThreads=1,
        )
        run_dir = scratch / f"term-{trial}"
        stderr = _preempt_after(run_dir, snapshot, config, 2, rng.randint(3, 30))
        done = max(int(m) for m in re.findall(r"INFO step (\d+)/", stderr))
        saved = list_checkpoint_dirs(RunLayout(run_dir).checkpoints_dir)[-1][0]
        lost.append(done - saved)
    out["ddp_steps_lost_per_sigterm"] = entry(
        statistics.mean(lost),
        "steps",
        "0",
        f"3 tiny 2-process legs SIGTERMed (to the leg's supervisor, which forwards to both ranks) after a random "
        f"step in 3..30: completed steps in rank 0's log minus the step of the emergency checkpoint (each: {lost}); "
        "exit 75 each time",
    )


def bench_world_change(scratch: Path, snapshot: Path, out: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    from trainer.volume import RunLayout

    config = write_config(
        scratch / "config-world.json", model="tiny", maxSteps=120, checkpointEverySteps=20, torchThreads=1
    )
    _, two_seconds = _run(scratch / "reference", snapshot, config, 2)
    _, one_seconds = _run(scratch / "one", snapshot, write_config(
        scratch / "config-one.json", model="tiny", maxSteps=120, checkpointEverySteps=20, torchThreads=1,
        gradientAccumulationSteps=2), 1)  # fmt: skip
    run_dir = scratch / "changed"
    _preempt_after(run_dir, snapshot, config, 2, 30)
    _preempt_after(run_dir, snapshot, config, 1, 70)
    _run(run_dir, snapshot, config, 2)
    ours = load_file(str(RunLayout(run_dir).final_dir / "model.safetensors"))
    reference = load_file(str(RunLayout(scratch / "reference").final_dir / "model.safetensors"))
    difference = max(float((ours[k] - reference[k]).abs().max()) for k in reference)
    rows = 120 * 32
    out["ddp_resume_world_size_change_max_abs_diff"] = entry(
        difference,
        "max abs weight difference",
        f"<= {TOLERANCE:g}",
        f"tiny model, 120 steps of global batch 32 (16 per rank): preempted on 2 processes after step 30, resumed "
        f"on 1 (accumulating 2 micro-batches), preempted after step 70, finished on 2; against an uninterrupted "
        f"2-process run. For information (2 shared cores): whole legs {rows / two_seconds:.1f} samples/s on 2 "
        f"processes vs {rows / one_seconds:.1f} on 1 with the same global batch, start-up included",
    )


def run(out: dict[str, Any]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = os.environ.get("RELAY_BENCH_DIR") or None
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-ddp-", dir=root))
    try:
        snapshot = rotten_tomatoes_snapshot(scratch / "snapshot", train_rows=1600, eval_rows=200)
        bench_sigterm(scratch, snapshot, out)
        bench_world_change(scratch, snapshot, out)
        bench_stall(scratch, snapshot, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    results: dict[str, Any] = {}
    run(results)
    print(json.dumps(results, indent=2))
