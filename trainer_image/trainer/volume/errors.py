"""The one error of the volume contract: a checkpoint or snapshot folder that must not be used."""

from __future__ import annotations


class CheckpointInvalid(Exception):
    """A checkpoint folder that must not be loaded; the message names the file at fault."""
