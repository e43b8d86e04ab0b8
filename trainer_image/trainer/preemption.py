"""Preemption: SIGTERM/SIGINT become a stop request; the leg finishes its step, saves it and exits 75.

The handler only sets a flag (StopRequest); the training loop looks at it between optimizer steps, and
evaluation before each batch. A stop seen between steps ends the leg through `finish_preempted` (an emergency
checkpoint of the finished step, exit 75); one seen elsewhere raises errors.Preempted, whose message says which
checkpoint holds the run. Either way the controller resumes the run from that checkpoint, losing no step.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

from trainer.config import TrainerConfig
from trainer.reporting import Reporter, fmt_duration
from trainer.volume import ExitCode

if TYPE_CHECKING:
    from trainer.checkpoint_policy import CheckpointPolicy

log = logging.getLogger("trainer")


class StopRequest:
    """Set by SIGTERM/SIGINT; the training loop checks it between optimizer steps."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received_at: float | None = None
        self.signal_name = ""

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        if not self.event.is_set():
            self.received_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name
            self.event.set()

    def set_by_peer(self) -> None:
        """Another rank of a data-parallel leg was asked to stop: this one stops at the same step (distributed)."""
        if not self.event.is_set():
            self.received_at = time.monotonic()
            self.signal_name = "SIGTERM (to another rank)"
            self.event.set()

    def install(self) -> dict[int, Any]:
        """Install the handlers; returns the previous ones (for `restore`)."""
        return {signum: signal.signal(signum, self.handler) for signum in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def restore(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def finish_preempted(
    stop: StopRequest, step: int, policy: CheckpointPolicy, config: TrainerConfig, reporter: Reporter
) -> tuple[ExitCode, str]:
    """The loop stopped after finishing `step`: wait for any write in flight, save this step, exit 75 with a
    message that says how long it took against the grace period."""
    reporter.update(state="checkpointing", message=f"{stop.signal_name}: saving step {step}")
    policy.emergency_save(step)
    elapsed = time.monotonic() - (stop.received_at or time.monotonic())
    within = "within" if elapsed <= config.sigterm_grace_seconds else "OVER"
    message = (
        f"preempted: {stop.signal_name} received; finished step {step} and saved checkpoint step {step} "
        f"{fmt_duration(elapsed)} after the signal ({within} the {config.sigterm_grace_seconds:g} s grace)"
    )
    log.warning(message)
    reporter.update(state="preempted", message=message, step=step)
    return ExitCode.PREEMPTED, message
