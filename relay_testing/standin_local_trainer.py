"""A stand-in for `python -m trainer train` below the local backend: same arguments, exit codes and signals.

Run by the local backend as `python -m relay_testing.standin_local_trainer` (its `trainer_module`).

Behaviour from RELAY_STANDIN: "run" (sleep until SIGTERM, then exit 75 like a trainer that saved a
checkpoint), "exit:<code>" (exit at once with that code), "stubborn" (ignore SIGTERM; only SIGKILL ends it),
"raise" (fail as the trainer does: a traceback in the log, its one-line reason as termination message, exit 1),
"progress" (like "run", rewriting progress.json every 0.1 s as a training trainer does; "run" writes none, so it
looks stalled).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--snapshot", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--generation", type=int)  # the real trainer's fence (trainer.volume.fencing)
    args = parser.parse_args()
    mode = os.environ.get("RELAY_STANDIN", "run")
    if mode == "raise":
        from trainer.volume import write_termination_message

        print('Traceback (most recent call last):\n  File "train.py", line 3, in <module>', file=sys.stderr)
        print("    schedule = build_schedule(steps)", file=sys.stderr, flush=True)  # the last line: a source line
        write_termination_message("ValueError: warmup needs at least 1 step, got 0")
        return 1
    if mode.startswith("exit:"):
        print("error: something the trainer could not handle", file=sys.stderr, flush=True)
        return int(mode.split(":")[1])
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
    print(f"standin trainer pid {os.getpid()} mode {mode}: ready", flush=True)
    step = 0
    while True:
        time.sleep(0.05 if mode != "progress" else 0.1)
        if mode == "progress":
            from trainer.volume import RunLayout, write_progress

            step += 1
            write_progress(RunLayout(Path(args.run_dir)), {"state": "running", "step": step, "pid": os.getpid()})


if __name__ == "__main__":
    sys.exit(main())
