"""The scale benchmark's stand-in leg: the test tier's stand-in trainer, training until the benchmark says stop.

Same command line and volume contract as `relay_testing/standin_trainer.py` (whose checkpoint writer it uses:
real checkpoints with manifests, progress.json every step, final/ with metrics.json, SIGTERM -> checkpoint and
exit 75), but a leg ends when the file named by RELAY_STANDIN_FINISH_FILE exists (the process kubelet runs pods
as local processes, so a host path reaches them all), not after a fixed number of steps. So every leg of a level
runs through its steady window however long the ramp took, and all of them then finish together.
Env: RELAY_STANDIN_STEP_S, RELAY_STANDIN_CHECKPOINT_EVERY, RELAY_STANDIN_FINISH_FILE.
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

from relay_testing.standin_trainer import save_checkpoint
from trainer import volume


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--snapshot", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--generation", type=int)  # the real trainer's fence (trainer.volume.fencing)
    args = parser.parse_args(argv)
    step_s = float(os.environ.get("RELAY_STANDIN_STEP_S", "3"))
    every = int(os.environ.get("RELAY_STANDIN_CHECKPOINT_EVERY", "5"))
    finish = Path(os.environ["RELAY_STANDIN_FINISH_FILE"])
    layout = volume.RunLayout(Path(args.run_dir))
    latest, _ = volume.find_latest_checkpoint(layout.checkpoints_dir, verify_hashes=True)
    step = latest.step if latest else 0
    state = (latest.path / "weights.txt").read_text(encoding="utf-8") if latest else "seed"
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    while not finish.exists():
        if stop["requested"]:
            save_checkpoint(layout, step, state)
            return int(volume.ExitCode.PREEMPTED)
        time.sleep(step_s)
        step += 1
        state = hashlib.sha256(f"{state}:{step}".encode()).hexdigest()
        if step % every == 0:
            save_checkpoint(layout, step, state)
        volume.write_progress(layout, {"step": step, "epoch": 0, "loss": 1.0 / (step + 1)})
    tmp = layout.run_dir / f"{volume.TMP_PREFIX}final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "weights.txt").write_text(state, encoding="utf-8")
    (tmp / "metrics.json").write_text('{"accuracy": 1.0}\n', encoding="utf-8")
    volume.write_manifest(tmp, step=step, epoch=0, config_hash="standin")
    shutil.rmtree(layout.final_dir, ignore_errors=True)
    os.replace(tmp, layout.final_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
