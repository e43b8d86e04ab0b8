"""The trainer's documented exit codes: Job specs and the workflow classify legs by them."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """The trainer's documented exit codes; Job specs and the workflow classify legs by them."""

    COMPLETE = 0  # training finished, final model written
    FAILED = 1  # an error of the trainer's own (bug, OOM raised as exception, I/O error)
    INVALID_INPUT = 65  # EX_DATAERR: bad config, snapshot, fields, labels or model; do not retry
    PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving a checkpoint; resume next leg
    FENCED = 76  # EX_PROTOCOL: a newer leg owns the run folder (volume.fencing); committed nothing after it
