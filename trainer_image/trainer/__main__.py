"""Command line: `python -m trainer train ...` (one leg) and `python -m trainer predict ...` (inference).

`train --processes N` (N > 1) is a data-parallel leg: this process supervises N ranks run by torchrun
(trainer.launch), each of which is `python -m trainer train` again with torchrun's RANK and WORLD_SIZE. With
`--nnodes M --rdzv-endpoint host:port` it is one node of a multi-node leg: M such supervisors meet there.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from trainer.volume import ExitCode, write_termination_message


class _Parser(argparse.ArgumentParser):
    """Usage errors are invalid input: one line, exit 65."""

    def error(self, message: str) -> NoReturn:
        print(f"invalid input: {self.prog}: {message}", file=sys.stderr)
        write_termination_message(f"{self.prog}: {message}")
        raise SystemExit(ExitCode.INVALID_INPUT)


def _processes(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process count (1 to 64)")
    return int(text)


def _nodes(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a node count (1 to 64)")
    return int(text)


def _generation(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a leg number (0 or more)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m trainer", description="Relay trainer: one training leg, or predictions.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="run (or carry on) training; resumes from the newest checkpoint")
    train.add_argument("--run-dir", required=True, type=Path, help="the run's folder on the volume")
    train.add_argument("--snapshot", required=True, type=Path, help="the dataset snapshot folder")
    train.add_argument("--config", required=True, type=Path, help="TrainerConfig JSON (camelCase)")
    train.add_argument(
        "--generation",
        type=_generation,
        help="the leg number the controller launched this leg as: it commits nothing once fence.json names a newer one",
    )
    train.add_argument(
        "--processes",
        type=_processes,
        default=1,
        help="data-parallel ranks of this leg, run through torchrun (gloo on CPU, NCCL on CUDA); default 1",
    )
    train.add_argument(
        "--nnodes",
        type=_nodes,
        default=1,
        help="nodes of a multi-node leg, each running --processes ranks; they meet at --rdzv-endpoint (c10d)",
    )
    train.add_argument(
        "--rdzv-endpoint",
        help="host:port of node 0's c10d rendezvous (a multi-node leg); this node's index from JOB_COMPLETION_INDEX",
    )
    train.add_argument(
        "--allow-uneven-accumulation",
        action="store_true",
        help="resume on a world size that does not divide the run's global batch: ranks accumulate unequal shares",
    )
    predict = commands.add_parser("predict", help="labels and probabilities from a final model or a checkpoint")
    predict.add_argument("--model", required=True, type=Path, help="final/ folder or checkpoints/step-N folder")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--text", nargs="+", action="extend", help="one or more texts (repeatable; --text=-x for one starting with -)"
    )
    source.add_argument("--file", type=Path, help="a file with one text per line (a .json file: a JSON array of texts)")
    predict.add_argument("--json", action="store_true", help="JSON lines: {text, label, probabilities}")
    predict.add_argument(
        "--output", type=Path, help="write {predictions: [...]} (or {error, exitCode}) to this JSON file instead"
    )
    predict.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present")
    predict.add_argument("--batch-size", type=int, default=32)
    return parser


def main(argv: list[str] | None = None) -> int:
    from trainer.reporting import setup_logging

    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    setup_logging()
    from trainer.predict import run_predict

    return int(
        run_predict(
            args.model,
            texts=args.text,
            file=args.file,
            as_json=args.json,
            batch_size=args.batch_size,
            output=args.output,
            device=args.device,
        )
    )


def _train(args: argparse.Namespace) -> int:
    """One leg: a single process, the supervisor of a data-parallel leg's ranks, or one of those ranks."""
    from trainer.distributed import RESULTS_ENV, World
    from trainer.leg_log import tee_leg_log
    from trainer.reporting import setup_logging

    rank = World.from_env() if os.environ.get(RESULTS_ENV) else None
    first_node = os.environ.get("JOB_COMPLETION_INDEX", "") in ("", "0")  # one supervisor per leg log
    if (rank is None and first_node) or (rank is not None and rank.is_main):
        tee_leg_log(args.run_dir)  # on Kubernetes ($RELAY_LEG): the leg's lines also go to legs/<n>.log
    setup_logging()
    if rank is None and (args.processes > 1 or args.nnodes > 1):
        from trainer.launch import Rendezvous, run_processes

        forwarded = ["--run-dir", str(args.run_dir), "--snapshot", str(args.snapshot), "--config", str(args.config)]
        if args.generation is not None:
            forwarded += ["--generation", str(args.generation)]
        if args.allow_uneven_accumulation:
            forwarded.append("--allow-uneven-accumulation")
        rendezvous = None
        if args.nnodes > 1:
            run_id = f"relay-leg-{args.generation if args.generation is not None else 0}"
            try:
                rendezvous = Rendezvous.from_args(args.nnodes, args.rdzv_endpoint, run_id)
            except ValueError as exc:
                logging.getLogger("trainer").error("invalid input: %s", exc)
                write_termination_message(str(exc))
                return int(ExitCode.INVALID_INPUT)
        return run_processes(args.processes, forwarded, rendezvous)

    from trainer.train import run_leg

    if rank is None:
        result = run_leg(args.run_dir, args.snapshot, args.config, generation=args.generation)
        return int(result.exit_code)
    from trainer.launch import record_end, record_start
    from trainer.volume.termination import TERMINATION_LOG_ENV

    record_start(rank.local_rank)  # this node's ranks, by their place on it
    if not rank.is_main:  # rank 0 speaks for the leg: its log lines, its termination message
        os.environ.pop(TERMINATION_LOG_ENV, None)
        logging.getLogger("trainer").setLevel(logging.WARNING)
    result = run_leg(
        args.run_dir,
        args.snapshot,
        args.config,
        generation=args.generation,
        world=rank,
        allow_uneven=args.allow_uneven_accumulation,
    )
    record_end(rank.local_rank, int(result.exit_code), result.message)
    return int(result.exit_code)


if __name__ == "__main__":
    sys.exit(main())
