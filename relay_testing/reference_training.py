"""The reference a resumed or disturbed run is compared with: the real trainer, one process, never interrupted."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_uninterrupted(volume_root: Path, snapshot: str, config: Path, run_dir: Path, timeout_s: float = 300) -> Path:
    """`python -m trainer train` on the run's snapshot and config.json (one torch thread, as the legs run);
    the path of its final weights."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir),
               "--snapshot", str(volume_root / snapshot), "--config", str(config)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **OFFLINE_ENV}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    if result.returncode != 0:
        raise AssertionError(f"the reference training failed: {result.stdout[-1500:]}{result.stderr[-1500:]}")
    return run_dir / "final/model.safetensors"
