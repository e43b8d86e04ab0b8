"""The trainer's GPU figures (issue 19, item 5): bf16 samples/s against the best-configured HF Trainer, and
throughput with vs without checkpointing plus the checkpoint stall, on one CUDA device.

MiniLM on bench_trainer's Rotten Tomatoes snapshot, through the real trainer (trainer.train.run_leg) and the
real checkpoint writer. The HF side is bench_hf_peer's best configuration (group_by_length, its default fused
AdamW, the same checkpoint cadence, seed and hyperparameters) with bf16 autocast on the same device; runs
alternate. The with/without-checkpointing pairs are bench_trainer.training_pairs, with the device, precision
and shape of this module added to every config it writes.

NOT yet run on a GPU: it was written and checked end to end on CPU only (`--cpu-smoke`). hack/gpu-trainer-bench.sh
runs it; about 2-3 minutes on one H100 by estimate (GPU_SHAPE), within the script's 300 s limit.

    python -m bench.bench_gpu_trainer --out results.json   # CUDA; exit 2 without a CUDA device
    python -m bench.bench_gpu_trainer --out smoke.json --cpu-smoke   # the same code on CPU, tiny, fp32

Writes `{"value", "unit", "target", "method"}` entries (bench_trainer.entry) to --out after each part, and a
markdown table beside it (same name, .md), so a run cut short by its time limit keeps what it measured.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import bench_hf_peer
from bench.bench_hf_peer import LEARNING_RATE, WEIGHT_DECAY
from bench.bench_trainer import MINILM, capture_bench_state, entry, rotten_tomatoes_snapshot, training_pairs

EXIT_NO_CUDA = 2


@dataclass(frozen=True)
class Shape:
    """What one invocation measures at: the device and precision, the batch shape, the run length and cadence."""

    device: str  # "cuda" or "cpu" (the smoke run only)
    precision: str  # "bf16" or "fp32"
    batch: int
    max_length: int
    steps: int  # optimizer steps per run
    checkpoint_every: int  # steps; the last step is saved too (synchronously, after the loop on both sides)
    rounds: int  # alternating pairs of runs, for the HF comparison and for with/without checkpointing
    train_rows: int  # a multiple of `batch`: every batch is full on both sides, so HF's samples are steps x batch
    eval_rows: int
    save_reps: int  # synchronous saves timed for the stall fraction's denominator
    smoke: bool

    @property
    def key_prefix(self) -> str:
        return "cpu_smoke_" if self.smoke else "gpu_"

    @property
    def peer(self) -> bench_hf_peer.PeerShape:
        """This shape as bench_hf_peer's runs take it."""
        return bench_hf_peer.PeerShape(
            device=self.device,
            precision=self.precision,
            batch=self.batch,
            max_length=self.max_length,
            steps=self.steps,
            checkpoint_every=self.checkpoint_every,
            threads=torch_threads(self),
        )


# One H100, by estimate (not measured: no GPU was available when this was written): a MiniLM step at batch 32,
# bf16 autocast, about 8-15 ms (launch-bound: ~500 kernels), so 600 steps ~5-9 s; a 273 MB checkpoint ~0.5-1.5 s
# (device-to-host copy, hashing, write, fsync), below the ~5-9 s between checkpoints every 150 steps. Each run adds
# model load, tokenisation, evaluation and the final save (HF: 4 synchronous saves): ~12-20 s a run, 8 runs, plus
# CUDA start-up and the snapshot: ~2-3 minutes, at most ~4 if steps take 25 ms.
GPU_SHAPE = Shape(
    device="cuda",
    precision="bf16",
    batch=32,
    max_length=128,
    steps=600,
    checkpoint_every=150,
    rounds=2,
    train_rows=4000,
    eval_rows=800,
    save_reps=3,
    smoke=False,
)
# Proves the code path end to end on CPU (about 20 s on 2 busy cores); its figures measure nothing.
SMOKE_SHAPE = Shape(
    device="cpu",
    precision="fp32",
    batch=8,
    max_length=32,
    steps=6,
    checkpoint_every=3,
    rounds=1,
    train_rows=64,
    eval_rows=32,
    save_reps=1,
    smoke=True,
)


def torch_threads(shape: Shape) -> int:
    """Every core on the GPU run (the trainer's default shape); one on the smoke run, to stay light."""
    return 1 if shape.smoke else len(os.sched_getaffinity(0))


def trainer_settings(shape: Shape) -> dict[str, Any]:
    """The TrainerConfig fields (camelCase) that put a run on this shape's device, precision and batch shape."""
    return {
        "device": shape.device,
        "precision": shape.precision,
        "batchSize": shape.batch,
        "maxSeqLength": shape.max_length,
        "logEverySteps": max(1, shape.steps // 4),
    }


def describe_device(shape: Shape) -> str:
    """The device in words for the method texts: the GPU's name, torch's and transformers' versions."""
    import torch
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if shape.smoke:
        return f"SMOKE RUN on CPU (fp32, tiny sizes; not a GPU figure, measures nothing), {versions}"
    return f"{torch.cuda.get_device_name(0)}, {shape.precision} autocast, {versions}, CUDA {torch.version.cuda}"


# ---------------------------------------------------------------- Relay vs the HF Trainer


def versus_hf(scratch: Path, snapshot: Path, shape: Shape, device: str, out: dict[str, Any]) -> None:
    """`rounds` alternating Relay / HF runs; the samples/s ratio of the loops and both accuracies."""
    relay, hf, _ = bench_hf_peer.compare(scratch, snapshot, shape.peer, shape.rounds)
    relay_rate = statistics.mean(rate for rate, _ in relay)
    hf_rate = statistics.mean(rate for rate, _, _ in hf)
    hf_own = statistics.mean(own for _, own, _ in hf)
    relay_accuracy, hf_accuracy = relay[0][1], hf[0][2]
    setup = (
        f"{device}: MiniLM on Rotten Tomatoes ({shape.train_rows} train rows, {shape.eval_rows} eval), "
        f"{shape.steps} steps of batch {shape.batch}, max length {shape.max_length}, lr {LEARNING_RATE}, "
        f"checkpoints every {shape.checkpoint_every} steps; HF Trainer with group_by_length, "
        f"{'bf16' if shape.precision == 'bf16' else 'fp32'} and its default fused AdamW; {shape.rounds} "
        f"alternating rounds in one process"
    )
    out[f"{shape.key_prefix}samples_per_s_vs_hf_best"] = entry(
        relay_rate / hf_rate,
        "ratio",
        ">= 1.0",
        f"{setup}: Relay {relay_rate:.1f} training samples/s (each {', '.join(f'{r:.1f}' for r, _ in relay)}) "
        f"vs HF {hf_rate:.1f} (each {', '.join(f'{r:.1f}' for r, _, _ in hf)}), both the training loop from "
        f"its start to the end of the last step, in-loop checkpoints included, the final save not; HF's own "
        f"train_samples_per_second (its final save included) {hf_own:.1f}, ratio {relay_rate / hf_own:.3f}",
    )
    out[f"{shape.key_prefix}accuracy_vs_hf_best"] = entry(
        100 * (relay_accuracy - hf_accuracy),
        "points",
        "within +-1",
        f"{setup}: eval accuracy Relay {relay_accuracy:.4f} (each {', '.join(f'{a:.4f}' for _, a in relay)}) vs "
        f"HF {hf_accuracy:.4f} (each {', '.join(f'{a:.4f}' for _, _, a in hf)}); the data order differs",
    )


# ---------------------------------------------------------------- with vs without checkpointing, the stall


def synchronous_save_seconds(scratch: Path, shape: Shape) -> list[float]:
    """Seconds of `save_reps` synchronous saves of MiniLM + AdamW (the trainer's AdamW on this device, moments
    populated by one step) from the device: capture + copy to host + files + hashes + fsync + manifest + rename,
    the trainer's own save_now (its save of a run's last step)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from trainer import checkpoint as ckpt
    from trainer import modeling
    from trainer.config import TrainerConfig
    from trainer.optimizer import build_adamw

    modeling.quiet_transformers()
    device = torch.device(shape.device)
    config = TrainerConfig.model_validate({"model": MINILM, "torchThreads": torch_threads(shape)})
    model = modeling.build_model(config, tokenizer=None).to(device)
    model.train()
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = build_adamw(groups, lr=LEARNING_RATE, device=device, implementation=None)
    scheduler = get_linear_schedule_with_warmup(optimizer, 10, 100)
    batch = torch.randint(1000, 20000, (shape.batch, shape.max_length), device=device)
    labels = torch.zeros(shape.batch, dtype=torch.long, device=device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=shape.precision == "bf16"):
        loss = model(input_ids=batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    writer = ckpt.AsyncCheckpointWriter(scratch / "synchronous-saves", keep_last=shape.save_reps + 1)
    seconds = []
    try:
        for rep in range(shape.save_reps):
            started = time.perf_counter()
            state = capture_bench_state(model, optimizer, scheduler, rep + 1, writer.buffers)
            writer.save_now(state)
            seconds.append(time.perf_counter() - started)
    finally:
        writer.close()
        shutil.rmtree(scratch / "synchronous-saves", ignore_errors=True)
    del model, optimizer
    if shape.device == "cuda":
        torch.cuda.empty_cache()
    return seconds


def bench_checkpointing(
    scratch: Path, snapshot: Path, shape: Shape, device: str, saves: list[float], out: dict[str, Any]
) -> None:
    """bench_trainer.training_pairs on this shape: throughput with / without checkpoints, and the median cost to
    training per checkpoint (the trainer's checkpoint lines, via bench_trainer.CheckpointCosts) over one
    synchronous save of the same checkpoint (`saves`: synchronous_save_seconds)."""
    found = training_pairs(
        scratch,
        snapshot,
        model=MINILM,
        steps=shape.steps,
        every=shape.checkpoint_every,
        rounds=shape.rounds,
        threads=torch_threads(shape),
        settings=trainer_settings(shape),
    )
    setup = (
        f"{device}: MiniLM on Rotten Tomatoes, batch {shape.batch}, max length {shape.max_length}, "
        f"{torch_threads(shape)} torch threads on {os.cpu_count()} CPUs, {shape.rounds} interleaved pairs of "
        f"{shape.steps}-step runs (bench_trainer.training_pairs), training-loop time only"
    )
    out[f"{shape.key_prefix}throughput_with_vs_without_checkpointing"] = entry(
        found["ratio"],
        "ratio",
        ">= 0.97",
        f"{setup}: {found['rate_with']:.1f} samples/s checkpointing every {shape.checkpoint_every} steps vs "
        f"{found['rate_without']:.1f} without (pairs {', '.join(f'{r:.3f}' for r in found['pair_ratios'])})",
    )
    costs: list[float] = found["costs"]
    cost = statistics.median(costs) if costs else float("nan")
    save_s = statistics.median(saves)
    out[f"{shape.key_prefix}checkpoint_stall_fraction"] = entry(
        cost / save_s,
        "fraction",
        "<= 0.2",
        f"{setup}: median cost to training per checkpoint written off-thread, from the trainer's checkpoint "
        f"lines (the training thread's wait + how much longer the steps that overlapped the write took than the "
        f"leg's usual step) {cost:.3f} s (each: {', '.join(f'{c:.3f}' for c in costs) or 'none logged'}; "
        f"overlapping {found['overlapping_steps']} steps of {found['step_seconds'] * 1000:.1f} ms), divided by "
        f"one synchronous save of the same checkpoint from the device (capture + copy to host + files + hashes + "
        f"fsync + manifest + rename, the trainer's save_now; median of {', '.join(f'{s:.3f}' for s in saves)}) "
        f"{save_s:.3f} s",
    )


# ---------------------------------------------------------------- the results file


def write_results(path: Path, shape: Shape, device: str, results: dict[str, Any], seconds: float) -> None:
    """--out as JSON (the entries and how they were taken) and a markdown table beside it (.md)."""
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    kind = "CPU smoke run (not GPU figures)" if shape.smoke else "GPU figures"
    document = {"date": stamp, "kind": kind, "device": device, "seconds": round(seconds, 1), "entries": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    rows = [
        f"| {key} | {found['value']:.4g} | {found['unit']} | {found['target']} | {found['method']} |"
        for key, found in results.items()
    ]
    path.with_suffix(".md").write_text(
        "\n".join(
            [
                f"# Relay trainer on a device: {kind}",
                "",
                f"- date: {stamp}",
                f"- device: {device}",
                f"- command: `python -m bench.bench_gpu_trainer{' --cpu-smoke' if shape.smoke else ''}` "
                f"({seconds:.0f} s so far)",
                "",
                "| figure | value | unit | target | method |",
                "|---|---|---|---|---|",
                *rows,
                "",
            ]
        )
    )


def run(out_path: Path, shape: Shape) -> dict[str, Any]:
    """Both parts on `shape`, the results file rewritten after each. The synchronous saves come first: they
    also warm the device up (CUDA context, cuBLAS, the autocast kernels), which would otherwise fall in the loop
    time of whichever run came first."""
    started = time.perf_counter()
    device = describe_device(shape)
    results: dict[str, Any] = {}
    root = os.environ.get("RELAY_BENCH_DIR") or None
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-gpu-", dir=root))
    try:
        snapshot = rotten_tomatoes_snapshot(
            scratch / "snapshot", train_rows=shape.train_rows, eval_rows=shape.eval_rows
        )
        saves = synchronous_save_seconds(scratch, shape)
        parts: dict[str, Callable[[], None]] = {
            "Relay vs the HF Trainer": lambda: versus_hf(scratch, snapshot, shape, device, results),
            "with vs without checkpointing": lambda: bench_checkpointing(
                scratch, snapshot, shape, device, saves, results
            ),
        }
        for name, part in parts.items():
            part_started = time.perf_counter()
            part()
            write_results(out_path, shape, device, results, time.perf_counter() - started)
            print(f"bench_gpu_trainer: {name} done in {time.perf_counter() - part_started:.0f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    from trainer.reporting import setup_logging

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results file (JSON; a .md table beside it)")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="run the same code on CPU with tiny sizes (fp32); no GPU figures"
    )
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not options.cpu_smoke and not torch.cuda.is_available():
        print(
            f"bench_gpu_trainer: no CUDA device visible to torch {torch.__version__} "
            f"(torch.cuda.is_available() is False); the GPU figures need one (--cpu-smoke runs the code on CPU)",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    setup_logging()
    shape = SMOKE_SHAPE if options.cpu_smoke else GPU_SHAPE
    started = time.perf_counter()
    results = run(options.out, shape)
    print(json.dumps(results, indent=2))
    print(
        f"bench_gpu_trainer: {len(results)} entries in {time.perf_counter() - started:.0f} s -> {options.out} "
        f"and {options.out.with_suffix('.md')}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
