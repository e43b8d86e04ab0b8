"""A light stand-in for `python -m trainer train`, for tests and the benchmark that measure the controller.

Run by the process kubelet as `python -m relay_testing.standin_trainer` in place of `python -m trainer`.

Same command line, same volume contract (checkpoints with manifests written last, progress.json,
final/ with metrics.json, exit codes 0/1/65/75, SIGTERM -> checkpoint and exit 75), no torch. The
"weights" are a hash chain over the steps, so a resumed run ends with the same final file as an
uninterrupted one. Behaviour comes from env vars (passed through LegSpec.extra_env):
RELAY_STANDIN_STEPS, RELAY_STANDIN_STEP_S, RELAY_STANDIN_CHECKPOINT_EVERY, RELAY_STANDIN_EXIT.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from trainer import volume


def save_checkpoint(layout: volume.RunLayout, step: int, state: str) -> None:
    """A real checkpoint of the stand-in's state: written under a temporary name, manifest last, then renamed."""
    layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    target = layout.checkpoints_dir / volume.checkpoint_dir_name(step)
    if target.exists():
        return
    tmp = layout.checkpoints_dir / f"{volume.TMP_PREFIX}{step}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "weights.txt").write_text(state, encoding="utf-8")
    volume.write_manifest(tmp, step=step, epoch=0, config_hash="standin", metrics={"loss": 1.0 / (step + 1)})
    os.replace(tmp, target)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--snapshot", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--generation", type=int)  # the real trainer's fence (trainer.volume.fencing)
    args = parser.parse_args(argv)
    forced = os.environ.get("RELAY_STANDIN_EXIT")
    if forced:
        print(f"stand-in: exiting with {forced} as asked", flush=True)
        return int(forced)
    steps = int(os.environ.get("RELAY_STANDIN_STEPS", "20"))
    step_s = float(os.environ.get("RELAY_STANDIN_STEP_S", "0.1"))
    every = int(os.environ.get("RELAY_STANDIN_CHECKPOINT_EVERY", "5"))
    layout = volume.RunLayout(Path(args.run_dir))
    volume.remove_stale_temp_dirs(layout.checkpoints_dir)
    latest, _ = volume.find_latest_checkpoint(layout.checkpoints_dir, verify_hashes=True)
    step = latest.step if latest else 0
    state = (latest.path / "weights.txt").read_text(encoding="utf-8") if latest else "seed"
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    print(f"stand-in: starting at step {step} of {steps}", flush=True)
    while step < steps:
        if stop["requested"]:
            save_checkpoint(layout, step, state)
            print(f"stand-in: SIGTERM, saved step {step}", flush=True)
            return int(volume.ExitCode.PREEMPTED)
        time.sleep(step_s)
        step += 1
        state = hashlib.sha256(f"{state}:{step}".encode()).hexdigest()
        if step % every == 0:
            save_checkpoint(layout, step, state)
        volume.write_progress(layout, {"step": step, "total_steps": steps, "epoch": 0, "loss": 1.0 / (step + 1)})
    final = layout.final_dir
    tmp = layout.run_dir / f"{volume.TMP_PREFIX}final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "weights.txt").write_text(state, encoding="utf-8")
    (tmp / "metrics.json").write_text('{"accuracy": 1.0}\n', encoding="utf-8")
    volume.write_manifest(tmp, step=step, epoch=0, config_hash="standin")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    print(f"stand-in: finished at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
