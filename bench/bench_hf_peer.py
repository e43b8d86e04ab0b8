"""The peer: Relay's trainer against the Hugging Face Trainer best-configured, side by side on the same work.

Same snapshot (bench_trainer's Rotten Tomatoes reviews), model (MiniLM, the offline mirror), hyperparameters
(batch 16, max length 64, lr 5e-5, weight decay 0.01 off biases and LayerNorms, linear schedule with 6% warm-up,
seeds 42 and 43, one per round), thread count (every core, the default) and checkpoint cadence (every 25
steps). The HF side is set up as well as it goes: `group_by_length` (Relay groups by length too) and its default
optimizer (fused AdamW in transformers 5). Runs alternate Relay / HF, so that the load of other processes hits
both alike.

`run(out)` adds `samples_per_s_vs_hf_best` (training samples/s, Relay / HF) and `accuracy_vs_hf_best` (eval
accuracy on 2000 reviews, mean over the rounds, Relay minus HF, in points). Needs the `bench` extra (accelerate,
which the HF Trainer requires); the trainer image does not carry it. About 8 minutes on 2 quiet cores;
`python -m bench.bench_hf_peer --steps N`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bench_trainer import MINILM, entry, rotten_tomatoes_snapshot, write_config

# One epoch of the 3200 training rows at batch 16: both sides then train on the same reviews, only in another
# order, so their samples/s compare the same work. At 150 steps (3/4 of an epoch) each side saw its own subset,
# whose lengths differ with the order: Relay's samples/s moved by 14% between two seeds, HF's by 1%. At 60 steps
# both are barely trained and their accuracies differ by several points with the data order alone.
STEPS = 200
CHECKPOINT_EVERY = 25
ROUNDS = 2
BATCH = 16
MAX_LENGTH = 64
LEARNING_RATE = 5e-5
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
SEED = 42
# 2000 eval rows: on the earlier 400 one accuracy's standard error was 2 points, twice the +-1 band it is judged by.
TRAIN_ROWS, EVAL_ROWS = 3200, 2000


@dataclass(frozen=True)
class PeerShape:
    """Where and at what shape both sides train: the CPU bench here, bench_gpu_trainer on a CUDA device."""

    device: str = "cpu"
    precision: str = "fp32"  # or "bf16" (autocast on both sides)
    batch: int = BATCH
    max_length: int = MAX_LENGTH
    steps: int = STEPS
    checkpoint_every: int = CHECKPOINT_EVERY
    threads: int = 0  # torch threads; 0: every usable core (the trainer's default)
    seed: int = SEED  # the classifier head's initialisation and the data order, on both sides

    @property
    def torch_threads(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))


def relay_run(scratch: Path, snapshot: Path, shape: PeerShape, name: str) -> tuple[float, float]:
    """(training samples/s, eval accuracy) of one Relay leg from scratch to its final model. Samples/s is the
    training loop's, in-loop checkpoints included, the final save after the loop not."""
    from trainer.train import run_leg

    config = write_config(
        scratch / f"{name}.json",
        model=MINILM,
        device=shape.device,
        precision=shape.precision,
        maxSteps=shape.steps,
        checkpointEverySteps=shape.checkpoint_every,
        torchThreads=shape.torch_threads,
        batchSize=shape.batch,
        maxSeqLength=shape.max_length,
        learningRate=LEARNING_RATE,
        weightDecay=WEIGHT_DECAY,
        warmupRatio=WARMUP_RATIO,
        seed=shape.seed,
    )
    run_dir = scratch / name
    result = run_leg(run_dir, snapshot, config, install_signals=False)
    if result.exit_code != 0:
        raise RuntimeError(f"Relay run {name} failed: {result.message}")
    accuracy = json.loads((run_dir / "final" / "metrics.json").read_text())["accuracy"]
    shutil.rmtree(run_dir)
    return result.stats.samples / result.stats.train_seconds, float(accuracy)


def hf_run(scratch: Path, snapshot: Path, shape: PeerShape, name: str) -> tuple[float, float, float]:
    """(training samples/s of the loop, HF's own train_samples_per_second, eval accuracy) of the HF Trainer,
    best-configured, on the same work.

    The loop's samples/s counts as Relay's does: from the start of training to the end of the last step (a
    callback), in-loop checkpoints included, the final save not. HF's train_samples_per_second also holds its
    final save, one synchronous 273 MB write; it is reported beside."""
    import datasets
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from trainer import modeling
    from trainer.volume import SNAPSHOT_DATA_DIR

    modeling.quiet_transformers()
    torch.set_num_threads(shape.torch_threads)
    # A Relay leg before this one in the process made torch deterministic (trainer.train); the HF Trainer's
    # default (full_determinism=False) leaves torch's own setting, which is this.
    torch.use_deterministic_algorithms(False)
    source = modeling.resolve_model_source(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(source)
    splits = datasets.load_from_disk(str(snapshot / SNAPSHOT_DATA_DIR))

    def encode(split: Any) -> Any:
        return split.map(
            lambda rows: tokenizer(rows["text"], truncation=True, max_length=shape.max_length),
            batched=True,
            remove_columns=["text"],
        )

    class LoopClock(TrainerCallback):
        """Seconds from on_train_begin to the end of the last optimizer step (before its save)."""

        def __init__(self) -> None:
            self.started = 0.0
            self.seconds = float("nan")

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == state.max_steps:
                if shape.device == "cuda":
                    torch.cuda.synchronize()  # HF keeps the loss on the device: the queued work is the step's
                self.seconds = time.perf_counter() - self.started

    train, evaluation = encode(splits["train"]), encode(splits["eval"])
    torch.manual_seed(shape.seed)  # the classifier head's initialisation, as Relay seeds it
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    arguments = TrainingArguments(
        output_dir=str(scratch / name),
        max_steps=shape.steps,
        per_device_train_batch_size=shape.batch,
        per_device_eval_batch_size=64,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(WARMUP_RATIO * shape.steps),
        seed=shape.seed,
        train_sampling_strategy="group_by_length",
        save_strategy="steps",
        save_steps=shape.checkpoint_every,
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=shape.device == "cpu",
        bf16=shape.precision == "bf16",
        dataloader_num_workers=0,
    )
    clock = LoopClock()
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[clock],
    )
    trained = trainer.train()
    predictions = trainer.predict(evaluation)
    accuracy = float(np.mean(np.argmax(predictions.predictions, axis=-1) == predictions.label_ids))
    if trainer.optimizer is None:
        raise RuntimeError(f"HF run {name}: the Trainer built no optimizer")
    group = trainer.optimizer.param_groups[0]
    if not group.get("fused"):  # the point of the comparison: HF at its best
        raise RuntimeError(f"the HF Trainer did not use fused AdamW: its param group {group}")
    if not math.isfinite(clock.seconds):
        raise RuntimeError(f"HF run {name}: the last step ({shape.steps}) was never reported to the callback")
    shutil.rmtree(scratch / name, ignore_errors=True)
    del trainer, model
    if shape.device == "cuda":
        torch.cuda.empty_cache()
    return shape.steps * shape.batch / clock.seconds, float(trained.metrics["train_samples_per_second"]), accuracy


def compare(
    scratch: Path, snapshot: Path, shape: PeerShape, rounds: int
) -> tuple[list[tuple[float, float]], list[tuple[float, float, float]], list[float]]:
    """`rounds` alternating Relay / HF runs (the order flips each round, so that other processes' load hits both
    alike), round r with seed shape.seed + r on both sides: Relay's (samples/s, accuracy), HF's (loop samples/s,
    its own samples/s, accuracy), load averages."""
    relay: list[tuple[float, float]] = []
    hf: list[tuple[float, float, float]] = []
    loads: list[float] = []
    for round_index in range(rounds):
        seeded = dataclasses.replace(shape, seed=shape.seed + round_index)
        for side in ("relay", "hf") if round_index % 2 == 0 else ("hf", "relay"):
            loads.append(os.getloadavg()[0])
            if side == "relay":
                relay.append(relay_run(scratch, snapshot, seeded, f"relay-{round_index}"))
            else:
                hf.append(hf_run(scratch, snapshot, seeded, f"hf-{round_index}"))
    return relay, hf, loads


def run(out: dict[str, Any], steps: int = STEPS, rounds: int = ROUNDS) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shape = PeerShape(steps=steps)
    root = os.environ.get("RELAY_BENCH_DIR") or None
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-hf-", dir=root))
    try:
        snapshot = rotten_tomatoes_snapshot(scratch / "snapshot", train_rows=TRAIN_ROWS, eval_rows=EVAL_ROWS)
        relay, hf, loads = compare(scratch, snapshot, shape, rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    relay_rate = statistics.mean(rate for rate, _ in relay)
    hf_rate = statistics.mean(rate for rate, _, _ in hf)
    hf_own = statistics.mean(own for _, own, _ in hf)
    relay_accuracy = statistics.mean(accuracy for _, accuracy in relay)
    hf_accuracy = statistics.mean(accuracy for _, _, accuracy in hf)
    loads_text = ", ".join(f"{x:.1f}" for x in loads)
    setup = (
        f"MiniLM on Rotten Tomatoes ({TRAIN_ROWS} train rows, {EVAL_ROWS} eval), {steps} steps of batch "
        f"{shape.batch}, max length {shape.max_length}, lr {LEARNING_RATE}, {shape.torch_threads} torch threads "
        f"on {os.cpu_count()} CPUs, checkpoints every {shape.checkpoint_every} steps; HF Trainer with "
        f"group_by_length and its default fused AdamW; {rounds} alternating rounds, load average before each "
        f"run {loads_text}"
    )
    out["samples_per_s_vs_hf_best"] = entry(
        relay_rate / hf_rate,
        "ratio",
        ">= 1.0",
        f"{setup}: Relay {relay_rate:.2f} training samples/s (each {', '.join(f'{r:.2f}' for r, _ in relay)}) "
        f"vs HF {hf_rate:.2f} (each {', '.join(f'{r:.2f}' for r, _, _ in hf)}), both the training loop from its "
        f"start to the end of the last step, in-loop checkpoints included, the final save not; HF's own "
        f"train_samples_per_second (its final save included) {hf_own:.2f}, ratio {relay_rate / hf_own:.3f}",
    )
    out["accuracy_vs_hf_best"] = entry(
        100 * (relay_accuracy - hf_accuracy),
        "points",
        "within +-1",
        f"{setup}: eval accuracy, mean over the rounds' seeds {SEED}..{SEED + rounds - 1}, Relay {relay_accuracy:.4f} "
        f"(each {', '.join(f'{a:.4f}' for _, a in relay)}) vs HF {hf_accuracy:.4f} (each "
        f"{', '.join(f'{a:.4f}' for _, _, a in hf)}); per seed only the data order differs (standard error of "
        f"one accuracy on {EVAL_ROWS} rows: about {100 * (0.8 * 0.2 / EVAL_ROWS) ** 0.5:.1f} points)",
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternating Relay/HF rounds")
    options = parser.parse_args()
    results: dict[str, Any] = {}
    run(results, options.steps, options.rounds)
    print(json.dumps(results, indent=2))
