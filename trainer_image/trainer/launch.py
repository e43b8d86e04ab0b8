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

A multi-node leg (`--nnodes M --rdzv-endpoint host:port`: one pod of an Indexed Job per node on Kubernetes) runs one
such supervisor per node; their torchruns meet by c10d rendezvous at the endpoint, which node 0 (JOB_COMPLETION_INDEX
0, the pod `<job>-0.<service>`) hosts. c10d numbers the nodes itself, so global rank 0 may live on any pod. Each
supervisor reads its own node's ranks by their LOCAL_RANK, and its pod exits with its local rank 0's code: the ranks
agree on stops through the all-reduce, so a SIGTERM to any one pod makes every pod save once (rank 0) and exit 75.
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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from trainer.distributed import RESULTS_ENV
from trainer.volume import ExitCode, write_termination_message

log = logging.getLogger("trainer")

LOST_RANK_EXIT = 128 + signal.SIGKILL  # a rank killed from outside: classified like a killed leg


NODE_INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in each pod of an Indexed Job: 0 .. completions-1
# How long a node's torchrun waits for the others at the rendezvous before it gives up (torchrun's own default);
# the controller judges a gang that never meets sooner (retries.rendezvousTimeoutSeconds) and deletes its Job.
RENDEZVOUS_JOIN_TIMEOUT_S = 600


@dataclass(frozen=True)
class Rendezvous:
    """Where a multi-node leg's nodes meet: `nodes` supervisors at `endpoint` (host:port), for the leg `run_id`;
    `node_index` is this node's JOB_COMPLETION_INDEX (node 0 hosts the c10d store), None when not set."""

    nodes: int
    endpoint: str
    run_id: str
    node_index: int | None = None

    @classmethod
    def from_args(cls, nodes: int, endpoint: str | None, run_id: str) -> Rendezvous:
        """The rendezvous of `--nnodes`/`--rdzv-endpoint`, this node's index from JOB_COMPLETION_INDEX; ValueError
        naming the argument or variable at fault."""
        if not endpoint:
            raise ValueError(f"--rdzv-endpoint: required with --nnodes {nodes} (host:port of node 0)")
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--rdzv-endpoint: {endpoint!r} is not host:port")
        raw = os.environ.get(NODE_INDEX_ENV)
        index = None
        if raw not in (None, ""):
            if not raw.isdigit() or int(raw) >= nodes:
                raise ValueError(f"{NODE_INDEX_ENV}: {raw!r} is not a node index below --nnodes {nodes}")
            index = int(raw)
        return cls(nodes, endpoint, run_id, index)

    def torchrun_args(self) -> list[str]:
        conf = f"join_timeout={RENDEZVOUS_JOIN_TIMEOUT_S}"
        if self.node_index is not None:  # explicit: a pod's hostname need not match the endpoint's name
            conf += f",is_host={int(self.node_index == 0)}"
        return [
            f"--nnodes={self.nodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
            f"--rdzv-conf={conf}",
        ]


def torchrun_command(processes: int, train_args: list[str], rendezvous: Rendezvous | None = None) -> list[str]:
    """The one command line of a data-parallel leg's ranks on this node (CPU/gloo and CUDA/NCCL alike): standalone
    for one node, c10d rendezvous with the other nodes for a multi-node leg."""
    where = rendezvous.torchrun_args() if rendezvous is not None else ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        f"--nproc-per-node={processes}",
        "--max-restarts=0",
        "-m",
        "trainer",
        "train",
        *train_args,
    ]


def record_start(rank: int) -> None:
    """A rank's pid, for the supervisor's signal forwarding (called by each rank at its start, with its rank on
    this node: LOCAL_RANK)."""
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


def run_processes(processes: int, train_args: list[str], rendezvous: Rendezvous | None = None) -> int:
    """Run the leg's ranks on this node to their end; the node's exit code (see leg_outcome)."""
    folder = Path(tempfile.mkdtemp(prefix="relay-ddp-"))
    received: list[int] = []
    try:
        env = {**os.environ, RESULTS_ENV: str(folder)}
        command = torchrun_command(processes, train_args, rendezvous)
        if rendezvous is None:
            log.info("data-parallel leg: %d processes: %s", processes, " ".join(command[1:9]))
        else:
            log.info(
                "data-parallel leg: node %s of %d, %d process(es) each, c10d rendezvous at %s",
                "?" if rendezvous.node_index is None else rendezvous.node_index,
                rendezvous.nodes,
                processes,
                rendezvous.endpoint,
            )
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
