"""Container benchmarks: a training leg in the trainer image against the same leg as a bare process, and the
size of each image `make images` builds.

`run(out)` adds `{"value", "unit", "target", "method"}` entries; `python -m bench.bench_containers` prints them as
JSON. The leg is MiniLM (the offline mirror, in the image and in the venv) on the Rotten Tomatoes reviews, one
torch thread, run in interleaved pairs: `docker run` with what a leg's pod gets (read-only root, UID 1000, no
capabilities, no-new-privileges, the cpu.shares of a 1-CPU request, a 4Gi memory limit, the volume bound) and
the same `python -m trainer train` on the host. Throughput is the trainer's own samples/s log lines after the
first window (model load and the first steps are not training speed). About 4 minutes on 2 busy cores. Needs a
Docker engine and both images (`make images`); scratch files go to $RELAY_BENCH_DIR (default: the system temp
folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.bench_trainer import entry, rotten_tomatoes_snapshot, write_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
LOG_EVERY = 10
PAIRS = 2
RATE = re.compile(r"step \d+/\d+ .*?\| ([0-9.]+) samples/s")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def images() -> dict[str, str]:
    """The tags `make images` builds: the chart's default controller image and the TrainingRun's default trainer."""
    from controller.spec import TrainingRunSpec

    chart = yaml.safe_load((REPO / "helm/relay/Chart.yaml").read_text(encoding="utf-8"))
    values = yaml.safe_load((REPO / "helm/relay/values.yaml").read_text(encoding="utf-8"))
    controller = f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    return {"controller": controller, "trainer": str(TrainingRunSpec.model_fields["image"].default)}


def image_size_mb(image: str) -> float:
    done = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"image {image} is not built (run `make images`): {done.stderr.strip()}")
    return int(done.stdout.strip()) / 1e6


def steady_rate(log: str) -> float:
    """Median of the trainer's samples/s windows after the first (which holds the first steps' warm-up)."""
    rates = [float(match) for match in RATE.findall(log)]
    if len(rates) < 3:
        raise RuntimeError(f"too few samples/s lines ({len(rates)}) in the leg's log:\n{log[-2000:]}")
    return statistics.median(rates[1:])


def leg_command(run_dir: str, snapshot: str, config: str) -> list[str]:
    return ["python", "-m", "trainer", "train", "--run-dir", run_dir, "--snapshot", snapshot, "--config", config]


def bare_leg(scratch: Path, name: str) -> float:
    command = leg_command(str(scratch / name), str(scratch / "snapshot"), str(scratch / "config.json"))
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"bare leg exit {done.returncode}: {done.stderr[-2000:]}")
    return steady_rate(done.stderr)


def container_leg(scratch: Path, name: str, image: str) -> float:
    mount = "/relay-volume"
    flags = ["--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp:rw,exec,mode=1777", "--user", "1000:1000",
             "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--cpu-shares", "1024", "--memory", "4g",
             "-v", f"{scratch}:{mount}"]  # fmt: skip
    for key, value in {**OFFLINE_ENV, "OMP_NUM_THREADS": "1", "HOME": "/tmp"}.items():
        flags += ["-e", f"{key}={value}"]
    command = leg_command(f"{mount}/{name}", f"{mount}/snapshot", f"{mount}/config.json")
    done = subprocess.run(
        ["docker", "run", *flags, "--entrypoint", "python", image, *command[1:]], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"container leg exit {done.returncode}: {done.stderr[-2000:]}")
    return steady_rate(done.stderr)


def bench_leg_overhead(scratch: Path, image: str, out: dict[str, Any]) -> None:
    rotten_tomatoes_snapshot(scratch / "snapshot", train_rows=STEPS * 16, eval_rows=64)
    write_config(scratch / "config.json", maxSteps=STEPS, logEverySteps=LOG_EVERY, checkpointEverySeconds=1e9)
    for path in [scratch, *scratch.rglob("*")]:  # the container's UID 1000 reads the snapshot and writes its run
        path.chmod(0o777 if path.is_dir() else 0o666)
    container, bare = [], []
    for pair in range(PAIRS):  # interleaved, so that load from other processes hits both alike
        container.append(container_leg(scratch, f"container-{pair}", image))
        bare.append(bare_leg(scratch, f"bare-{pair}"))
    ratio = statistics.mean(container) / statistics.mean(bare)
    out["container_leg_overhead"] = entry(
        ratio,
        "ratio",
        ">= 0.97",
        f"MiniLM on Rotten Tomatoes, batch 16, 1 torch thread, {PAIRS} interleaved pairs of {STEPS}-step legs: "
        f"{statistics.mean(container):.2f} samples/s in {image} (read-only root, UID 1000, cap-drop ALL, "
        f"--cpu-shares 1024, --memory 4g) vs {statistics.mean(bare):.2f} samples/s as a bare process (each: container "
        f"{[round(r, 2) for r in container]}, bare {[round(r, 2) for r in bare]}; median of the trainer's "
        f"samples/s windows of {LOG_EVERY} steps after the first)",
    )


def run(out: dict[str, Any]) -> None:
    if shutil.which("docker") is None:
        raise RuntimeError("no docker client: the container benchmarks need a Docker engine (make images)")
    tags = images()
    for name, image in tags.items():
        size = image_size_mb(image)
        out[f"image_size_mb_{name}"] = entry(
            size, "MB", "reported", f"`docker image inspect` .Size of {image} as `make images` builds it"
        )
    root = os.environ.get("RELAY_BENCH_DIR") or None
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-containers-", dir=root))
    try:
        bench_leg_overhead(scratch, tags["trainer"], out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    results: dict[str, Any] = {}
    run(results)
    print(json.dumps(results, indent=2))
