"""The trainer's typed errors; each maps to one documented exit code (see volume.ExitCode)."""

from __future__ import annotations


class InvalidInput(Exception):
    """Bad input (config, snapshot, fields, labels, model, run dir): a one-line message naming the field or file.

    The trainer exits with ExitCode.INVALID_INPUT and has written nothing into checkpoints/.
    """


class Preempted(Exception):
    """SIGTERM arrived where no further step can be taken (e.g. during evaluation); the newest checkpoint holds
    every completed step, so the trainer exits with ExitCode.PREEMPTED."""
