"""Helpers for the trainer tests: small dataset snapshots (built exactly as the controller does), configs, and
running the trainer as a real subprocess with torch pinned to one thread."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer.config import TrainerConfig
from trainer.volume import SNAPSHOT_DATA_DIR, write_snapshot_manifest

REPO = Path(__file__).resolve().parents[2]
POSITIVE = ["great", "superb", "lovely", "moving", "brilliant", "charming", "delightful", "funny"]
NEGATIVE = ["awful", "dull", "boring", "clumsy", "tedious", "bland", "messy", "painful"]
FILLER = ["the", "film", "plot", "actors", "story", "was", "and", "a", "scene", "ending", "music", "it", "really"]


def make_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Reviews whose label is learnable from a few sentiment words among filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 14))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def build_snapshot(folder: Path, splits: dict[str, list[dict[str, Any]]], *, write_manifest: bool = True) -> Path:
    """A snapshot as the controller's snapshot activity writes it: save_to_disk, then snapshot.json last."""
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
    empty = datasets.Dataset.from_dict({"text": [], "label": []}, features=features)
    dataset = datasets.DatasetDict(
        {name: datasets.Dataset.from_list(rows) if rows else empty for name, rows in splits.items()}
    )
    dataset.save_to_disk(str(folder / SNAPSHOT_DATA_DIR))
    if write_manifest:
        content = hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()
        fields = sorted({key for rows in splits.values() for row in rows for key in row})
        write_snapshot_manifest(
            folder,
            content_sha256=content,
            source={"kind": "test"},
            fields=fields,
            rows={name: len(rows) for name, rows in splits.items()},
        )
    return folder


TINY_SETTINGS: dict[str, Any] = {
    "model": "tiny",
    "numLabels": 2,
    "epochs": 2,
    "batchSize": 8,
    "learningRate": 3e-3,
    "warmupRatio": 0.1,
    "maxSeqLength": 32,
    "evalBatchSize": 16,
    "seed": 7,
    "device": "cpu",
    "checkpointEverySteps": 10,
    "keepLast": 2,
    "logEverySteps": 5,
    "torchThreads": 1,
}


def write_config(path: Path, **overrides: Any) -> Path:
    """A TrainerConfig JSON (camelCase), validated by the real model before writing."""
    config = TrainerConfig.model_validate({**TINY_SETTINGS, **overrides})
    path.write_text(config.to_json_text(), encoding="utf-8")
    return path


def trainer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_TEST_")}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return env | extra


def train_command(run_dir: Path, snapshot: Path, config: Path) -> list[str]:
    arguments = ["--run-dir", str(run_dir), "--snapshot", str(snapshot), "--config", str(config)]
    return [sys.executable, "-m", "trainer", "train", *arguments]


def run_train(
    run_dir: Path, snapshot: Path, config: Path, *, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m trainer train` as a real process, to its end."""
    return subprocess.run(
        train_command(run_dir, snapshot, config),
        capture_output=True,
        text=True,
        env=trainer_env(**env),
        timeout=timeout,
        cwd=REPO,
    )


def start_train(run_dir: Path, snapshot: Path, config: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        train_command(run_dir, snapshot, config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=trainer_env(**env),
        cwd=REPO,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
