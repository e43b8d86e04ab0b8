"""The supervisor of a data-parallel leg: `python -m trainer train --processes N ...` runs its N ranks through
torchrun (`python -m torch.distributed.run --standalone --nproc-per-node N --max-restarts 0 -m trainer train
...`) and turns their ends into the leg's one exit code.

torchrun itself exits 1 whenever a worker exits non-zero, which would make a preempted leg (every rank 75) look
failed; so each rank records its pid when it starts and its exit code and message when it ends, in a private
folder ($RELAY_DDP_RESULTS), and this process decides:

- every rank recorded an end: the leg's code and message are rank 0's (the ranks agree on stops, so a
  preempted leg is 75 on every rank; a failure or invalid input is rank 0's word);
- a rank ended without a record (SIGKILL, the kernel's OOM killer, a lost process): torchrun has torn the
  others down; the leg exits 137 (128 + SIGKILL), which the controller classifies like a killed leg: a
  preemption-like loss, resumed from the newest complete checkpoint (nothing newer is complete: only rank 0
  writes, a checkpoint's manifest last).

SIGTERM and SIGINT to this process (what Kubernetes and the local supervisor send) go to every rank directly
(torchrun starts its workers in sessions of their own), so they stop together at one step and save once; ranks
not started yet get it through torchrun.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from trainer.distributed import RESULTS_ENV
from trainer.volume import ExitCode, write_termination_message

log = logging.getLogger("trainer")

LOST_RANK_EXIT = 128 + signal.SIGKILL  # a rank killed from outside: classified like a killed leg


def torchrun_command(processes: int, train_args: list[str]) -> list[str]:
    """The one command line of a data-parallel leg's ranks (CPU/gloo and CUDA/NCCL alike)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "--max-restarts=0",
        "-m",
        "trainer",
        "train",
        *train_args,
    ]


def record_start(rank: int) -> None:
    """A rank's pid, for the supervisor's signal forwarding (called by each rank at its start)."""
    folder = os.environ.get(RESULTS_ENV)
    if folder:
        Path(folder, f"rank-{rank}.pid").write_text(str(os.getpid()), encoding="utf-8")


def record_end(rank: int, exit_code: int, message: str) -> None:
    """A rank's outcome (called by each rank at its end; absent for a rank that was killed)."""
    folder = os.environ.get(RESULTS_ENV)
    if folder:
        path = Path(folder, f"rank-{rank}.json")
        path.with_suffix(".tmp").write_text(json.dumps({"exit_code": exit_code, "message": message}), "utf-8")
        os.replace(path.with_suffix(".tmp"), path)


def _rank_pids(folder: Path) -> list[int]:
    pids = []
    for path in folder.glob("rank-*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(path.read_text(encoding="utf-8")))
    return pids


def leg_outcome(folder: Path, processes: int, signalled: bool = False) -> tuple[int, str]:
    """The leg's exit code and message from the ranks' records (see the module docstring); `signalled`: the leg
    was sent SIGTERM/SIGINT, so a rank without a record was most likely stopped while starting (exit 143)."""
    ends: dict[int, dict[str, object]] = {}
    for rank in range(processes):
        with contextlib.suppress(OSError, ValueError):
            ends[rank] = json.loads(Path(folder, f"rank-{rank}.json").read_text(encoding="utf-8"))
    lost = [rank for rank in range(processes) if rank not in ends]
    if lost and signalled:
        message = (
            f"rank {', '.join(map(str, lost))} of {processes} ended without a word after the leg's stop signal "
            "(stopped while starting?); the next leg resumes from the newest complete checkpoint"
        )
        return 128 + signal.SIGTERM, message
    if lost:
        message = (
            f"rank {', '.join(map(str, lost))} of {processes} ended without a word (killed: SIGKILL, OOM or lost); "
            "the leg's other ranks were stopped; the next leg resumes from the newest complete checkpoint"
        )
        return LOST_RANK_EXIT, message
    main = ends[0]
    return int(main["exit_code"]), str(main["message"])  # type: ignore[call-overload]


def run_processes(processes: int, train_args: list[str]) -> int:
    """Run the leg's ranks to their end; the leg's exit code (see leg_outcome)."""
    folder = Path(tempfile.mkdtemp(prefix="relay-ddp-"))
    received: list[int] = []
    try:
        env = {**os.environ, RESULTS_ENV: str(folder)}
        command = torchrun_command(processes, train_args)
        log.info("data-parallel leg: %d processes: %s", processes, " ".join(command[1:9]))
        child = subprocess.Popen(command, env=env)

        def forward(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)
            pids = _rank_pids(folder)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)
            if len(pids) < processes and child.poll() is None:
                child.send_signal(signum)  # a rank not started yet: torchrun passes it on

        previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            torchrun_code = child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        code, message = leg_outcome(folder, processes, signalled=bool(received))
        if code in (LOST_RANK_EXIT, 128 + signal.SIGTERM):
            log.error("%s (torchrun exited %d)", message, torchrun_code)
            write_termination_message(message)
        elif code in (ExitCode.COMPLETE, ExitCode.PREEMPTED):
            log.info("data-parallel leg: every rank ended; exit %d", code)
        return code
    finally:
        shutil.rmtree(folder, ignore_errors=True)
