"""`eval_overhead_fraction`: what evaluation during training (issue 15) adds to the training loop's time.

Side by side: interleaved pairs of real trainer legs (in process, `trainer.train.run_leg`), the tiny model on
the Rotten Tomatoes reviews (3200 train rows, 400 eval rows, batch 16, 400 steps, one torch thread), once with
`evalEverySteps: 50` (7 evaluations of the 400 rows during training; the 8th is the final one, which both
runs do) and once without; the order alternates so other load hits both alike. The figure is the evaluations'
seconds over the steps' seconds within the runs with evaluations (LegStats.eval_seconds against the rest of
LegStats.train_seconds, the loop without start-up or final evaluation): measured in the same minutes, it holds
on a machine shared with other work, where two equal runs minutes apart took 16.1 and 28.4 s. The side-by-side figure,
(loop seconds with - without) / without, is in the method text as the check. `python -m bench.bench_eval`
prints the entry as JSON. About two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_trainer import entry, rotten_tomatoes_snapshot, write_config

ROUNDS = 3
STEPS = 400
EVAL_EVERY = 50


def eval_pairs(scratch: Path, snapshot: Path, rounds: int = ROUNDS) -> dict[str, Any]:
    """Loop seconds with and without evaluations during training, per interleaved pair."""
    from trainer.train import run_leg

    seconds: dict[str, list[float]] = {"with": [], "without": [], "eval": []}
    for round_index in range(rounds):
        labels = ("with", "without") if round_index % 2 == 0 else ("without", "with")
        for label in labels:
            cadence = {"evalEverySteps": EVAL_EVERY} if label == "with" else {}
            config = write_config(
                scratch / f"config-{label}.json",
                model="tiny",
                maxSteps=STEPS,
                checkpointEverySteps=None,
                checkpointEverySeconds=1e9,
                evalBatchSize=64,
                **cadence,
            )
            run_dir = scratch / f"run-{label}-{round_index}"
            result = run_leg(run_dir, snapshot, config, install_signals=False)
            if result.exit_code != 0:
                raise RuntimeError(f"training run {label} evaluations failed: {result.message}")
            seconds[label].append(result.stats.train_seconds)
            if label == "with":
                seconds["eval"].append(result.stats.eval_seconds)
            shutil.rmtree(run_dir)
    return seconds


def run(out: dict[str, Any]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = os.environ.get("RELAY_BENCH_DIR") or None
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-eval-", dir=root))
    try:
        snapshot = rotten_tomatoes_snapshot(scratch / "snapshot", train_rows=3200, eval_rows=400)
        seconds = eval_pairs(scratch, snapshot)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with_eval, without, evaluating = sum(seconds["with"]), sum(seconds["without"]), sum(seconds["eval"])
    pairs = ", ".join(f"{w:.2f}/{o:.2f}" for w, o in zip(seconds["with"], seconds["without"], strict=True))
    out["eval_overhead_fraction"] = entry(
        evaluating / (with_eval - evaluating),
        "fraction of loop time",
        "reported (evaluating 400 rows every 800 trained rows)",
        f"tiny model, {STEPS} steps of batch 16, evalEverySteps {EVAL_EVERY} over 400 eval rows vs none; "
        f"{ROUNDS} interleaved pairs: evaluations {evaluating:.2f} s of {with_eval:.2f} s loop time; side by side "
        f"(with - without) / without = {(with_eval - without) / without:.3f} (loop seconds with/without {pairs})",
    )


if __name__ == "__main__":
    results: dict[str, Any] = {}
    run(results)
    print(json.dumps(results, indent=2))
