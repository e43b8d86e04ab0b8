"""The peer: Relay's trainer against the Hugging Face Trainer best-configured, side by side on the same work.

Same snapshot (bench_trainer's Rotten Tomatoes reviews), model (MiniLM, the offline mirror), hyperparameters
(batch 16, max length 64, lr 5e-5, weight decay 0.01 off biases and LayerNorms, linear schedule with 6% warm-up,
seed 42), thread count (every core, the default) and checkpoint cadence (every 25 steps). The HF side is set up
as well as it goes: `group_by_length` (Relay groups by length too) and its default optimizer (fused AdamW in
transformers 5). Runs alternate Relay / HF, so that the load of other processes hits both alike.

`run(out)` adds `samples_per_s_vs_hf_best` (training samples/s, Relay / HF) and `accuracy_vs_hf_best` (eval
accuracy, Relay minus HF, in points). Needs the `bench` extra (accelerate, which the HF Trainer requires); the
trainer image does not carry it. About 5 minutes on 2 quiet cores;
`python -m bench.bench_hf_peer --steps N`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_trainer import MINILM, entry, rotten_tomatoes_snapshot, write_config

# 150 steps, as in the measurement: at 60 both sides are barely trained and their accuracies differ by
# several points with the data order alone (measured: 0.5925 vs 0.5400), which says nothing about either trainer.
STEPS = 150
CHECKPOINT_EVERY = 25
ROUNDS = 2
BATCH = 16
MAX_LENGTH = 64
LEARNING_RATE = 5e-5
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
SEED = 42


def relay_run(scratch: Path, snapshot: Path, threads: int, steps: int, name: str) -> tuple[float, float]:
    """(training samples/s, eval accuracy) of one Relay leg from scratch to its final model."""
    from trainer.train import run_leg

    config = write_config(
        scratch / f"{name}.json",
        model=MINILM,
        maxSteps=steps,
        checkpointEverySteps=CHECKPOINT_EVERY,
        torchThreads=threads,
        batchSize=BATCH,
        maxSeqLength=MAX_LENGTH,
        learningRate=LEARNING_RATE,
        weightDecay=WEIGHT_DECAY,
        warmupRatio=WARMUP_RATIO,
        seed=SEED,
    )
    run_dir = scratch / name
    result = run_leg(run_dir, snapshot, config, install_signals=False)
    if result.exit_code != 0:
        raise RuntimeError(f"Relay run failed: {result.message}")
    accuracy = json.loads((run_dir / "final" / "metrics.json").read_text())["accuracy"]
    shutil.rmtree(run_dir)
    return result.stats.samples / result.stats.train_seconds, float(accuracy)


def hf_run(scratch: Path, snapshot: Path, threads: int, steps: int, name: str) -> tuple[float, float]:
    """(training samples/s, eval accuracy) of the HF Trainer, best-configured, on the same work."""
    import datasets
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from trainer import modeling
    from trainer.volume import SNAPSHOT_DATA_DIR

    modeling.quiet_transformers()
    torch.set_num_threads(threads)
    source = modeling.resolve_model_source(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(source)
    splits = datasets.load_from_disk(str(snapshot / SNAPSHOT_DATA_DIR))

    def encode(split: Any) -> Any:
        return split.map(
            lambda rows: tokenizer(rows["text"], truncation=True, max_length=MAX_LENGTH),
            batched=True,
            remove_columns=["text"],
        )

    train, evaluation = encode(splits["train"]), encode(splits["eval"])
    torch.manual_seed(SEED)  # the classifier head's initialisation, as Relay seeds it
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    arguments = TrainingArguments(
        output_dir=str(scratch / name),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=64,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(WARMUP_RATIO * steps),
        seed=SEED,
        train_sampling_strategy="group_by_length",
        save_strategy="steps",
        save_steps=CHECKPOINT_EVERY,
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=arguments, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)
    )
    trained = trainer.train()
    predictions = trainer.predict(evaluation)
    accuracy = float(np.mean(np.argmax(predictions.predictions, axis=-1) == predictions.label_ids))
    group = trainer.optimizer.param_groups[0]
    if not group.get("fused"):  # the point of the comparison: HF at its best
        raise RuntimeError(f"the HF Trainer did not use fused AdamW: its param group {group}")
    shutil.rmtree(scratch / name, ignore_errors=True)
    return float(trained.metrics["train_samples_per_second"]), accuracy


def run(out: dict[str, Any], steps: int = STEPS, rounds: int = ROUNDS) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = len(os.sched_getaffinity(0))
    root = os.environ.get("RELAY_BENCH_DIR") or None
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-hf-", dir=root))
    relay: list[tuple[float, float]] = []
    hf: list[tuple[float, float]] = []
    loads: list[float] = []
    try:
        snapshot = rotten_tomatoes_snapshot(scratch / "snapshot", train_rows=3200, eval_rows=400)
        for round_index in range(rounds):
            sides = [("relay", relay_run, relay), ("hf", hf_run, hf)]
            for name, side, found in sides if round_index % 2 == 0 else sides[::-1]:
                loads.append(os.getloadavg()[0])
                found.append(side(scratch, snapshot, threads, steps, f"{name}-{round_index}"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    relay_rate = statistics.mean(rate for rate, _ in relay)
    hf_rate = statistics.mean(rate for rate, _ in hf)
    relay_accuracy, hf_accuracy = relay[0][1], hf[0][1]  # each side is deterministic: every round gives the same
    setup = (
        f"MiniLM on Rotten Tomatoes (3200 train rows, 400 eval), {steps} steps of batch {BATCH}, max length "
        f"{MAX_LENGTH}, lr {LEARNING_RATE}, {threads} torch threads on {os.cpu_count()} CPUs, checkpoints every "
        f"{CHECKPOINT_EVERY} steps; HF Trainer with group_by_length and its default fused AdamW; {rounds} "
        f"alternating rounds, load average before each run {', '.join(f'{load:.1f}' for load in loads)}"
    )
    out["samples_per_s_vs_hf_best"] = entry(
        relay_rate / hf_rate,
        "ratio",
        ">= 1.0",
        f"{setup}: Relay {relay_rate:.2f} training samples/s (each {', '.join(f'{r:.2f}' for r, _ in relay)}; "
        f"training loop incl. checkpoints) vs HF {hf_rate:.2f} (each {', '.join(f'{r:.2f}' for r, _ in hf)}; "
        f"its train_samples_per_second, incl. checkpoints)",
    )
    out["accuracy_vs_hf_best"] = entry(
        100 * (relay_accuracy - hf_accuracy),
        "points",
        "within +-1",
        f"{setup}: eval accuracy Relay {relay_accuracy:.4f} vs HF {hf_accuracy:.4f}; only the data order differs",
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
