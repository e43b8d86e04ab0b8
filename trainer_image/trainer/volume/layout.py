"""Where things live on the shared volume: a run's folder, its files, checkpoint folder names, snapshot folders.

Every path of the contract is built here and nowhere else; readers (the controller, the plot, the drill, the
benchmarks) take them from `RunLayout` instead of joining names by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TMP_PREFIX = ".tmp-"  # in-progress writes; never read, removed at the trainer's start
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run's folder on the volume."""

    run_dir: Path

    @classmethod
    def for_run(cls, volume_root: Path | str, namespace: str, name: str) -> RunLayout:
        return cls(Path(volume_root) / run_path(namespace, name))

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.json"

    @property
    def progress_path(self) -> Path:
        return self.run_dir / "progress.json"

    @property
    def fence_path(self) -> Path:
        """The run's current generation, written by the controller before each launch (volume.fencing)."""
        return self.run_dir / "fence.json"

    @property
    def history_path(self) -> Path:
        """One JSON line per progress log line and evaluation, appended by every leg (the plot's loss curve)."""
        return self.run_dir / "history.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def quarantine_dir(self) -> Path:
        return self.run_dir / "quarantine"

    @property
    def final_dir(self) -> Path:
        return self.run_dir / "final"

    @property
    def final_metrics_path(self) -> Path:
        return self.final_dir / "metrics.json"

    @property
    def legs_dir(self) -> Path:
        return self.run_dir / "legs"

    def leg_record_path(self, leg: int) -> Path:
        return self.legs_dir / f"{leg}.json"

    def leg_log_path(self, leg: int) -> Path:
        """The leg's stdout and stderr (trainer.leg_log on Kubernetes, the local supervisor locally)."""
        return self.legs_dir / f"{leg}.log"

    def leg_log_rotated_path(self, leg: int) -> Path:
        """The leg log's previous part, once it reached its size cap (older lines than leg_log_path's)."""
        return self.legs_dir / f"{leg}.log.1"

    def leg_log_legs(self) -> list[int]:
        """Leg numbers with a legs/<n>.log, in order."""
        if not self.legs_dir.is_dir():
            return []
        stems = (path.name.removesuffix(".log") for path in self.legs_dir.glob("*.log"))
        return sorted(int(stem) for stem in stems if stem.isdigit())

    def leg_record_paths(self) -> list[tuple[int, Path]]:
        """(leg, legs/<n>.json) for every leg record, by leg number (the supervisor's <n>.*.json files are not)."""
        if not self.legs_dir.is_dir():
            return []
        found = ((path.name.removesuffix(".json"), path) for path in self.legs_dir.glob("*.json"))
        return sorted((int(stem), path) for stem, path in found if stem.isdigit())


def run_path(namespace: str, name: str) -> str:
    """A run's folder relative to the volume root, "runs/<namespace>/<name>" (what status reports)."""
    return f"runs/{namespace}/{name}"


def snapshot_dir(volume_root: Path | str, content_sha256: str) -> Path:
    return Path(volume_root) / "snapshots" / content_sha256


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def parse_step(dir_name: str) -> int | None:
    """Step number of a checkpoint folder name, or None for anything else (temp dirs, stray files)."""
    match = _STEP_DIR.match(dir_name)
    return int(match.group(1)) if match else None


def model_folders(model_dir: Path) -> list[Path]:
    """Every folder a model needs: itself, and for a training checkpoint (`checkpoints/step-N/`, which holds
    model_config.json instead of a saved model) the run's `tokenizer/` two levels up."""
    if (model_dir / "model_config.json").is_file():
        return [model_dir, model_dir.parent.parent / "tokenizer"]
    return [model_dir]
