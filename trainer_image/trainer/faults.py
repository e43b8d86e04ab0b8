"""Test-only fault injection: the one place where a RELAY_TEST_* variable can change what the trainer does.

`Faults.from_env()` reads the variables once per leg; the training loop, the evaluation and the checkpoint
writer call its named hooks at fixed points, and every hook is a no-op when no variable is set, so the
shipped code path never looks at a test variable itself. The variables (documented in trainer_image/README.md)
are set by tests/trainer, `relay drill` (controller/drill/core.py) and the benchmark; never in production.

The checkpoint writer runs on its own thread behind checkpoint.py's API, so it reaches the leg's faults
through `active()`, which `run_leg` sets for the leg with `injected()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields

log = logging.getLogger("trainer")

KILL_AFTER_STEP_ENV = "RELAY_TEST_KILL_AFTER_STEP"
SIGTERM_DURING_STEP_ENV = "RELAY_TEST_SIGTERM_DURING_STEP"
SIGTERM_DURING_EVAL_ENV = "RELAY_TEST_SIGTERM_DURING_EVAL"
EVAL_BATCH_SLEEP_ENV = "RELAY_TEST_EVAL_BATCH_SLEEP_S"
STEP_SLEEP_ENV = "RELAY_TEST_STEP_SLEEP_S"
KILL_IN_WRITE_ENV = "RELAY_TEST_KILL_IN_CHECKPOINT_WRITE"
COPY_DELAY_ENV = "RELAY_TEST_CHECKPOINT_COPY_DELAY_S"
WRITE_DELAY_ENV = "RELAY_TEST_CHECKPOINT_WRITE_DELAY_S"


class FaultSettingInvalid(ValueError):
    """A RELAY_TEST_* variable whose value does not parse; the message names the variable."""


@dataclass(frozen=True)
class Faults:
    """The faults to inject in one leg; the default injects none."""

    kill_after_step: int | None = None  # SIGKILL right after this optimizer step
    sigterm_during_step: int | None = None  # SIGTERM after the first micro-batch of this step
    sigterm_during_eval: bool = False  # SIGTERM before the first evaluation batch
    eval_batch_sleep_s: float = 0.0  # sleep after every evaluation batch, so a test can signal inside evaluation
    step_sleep_s: float = 0.0  # sleep after every step, so a test can aim a signal at a step from outside
    kill_in_checkpoint_write: int | None = None  # SIGKILL inside the write of this step's checkpoint
    checkpoint_copy_delay_s: float = 0.0  # writer thread: sleep before copying the tensors
    checkpoint_write_delay_s: float = 0.0  # writer thread: sleep after the first file, before the manifest

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Faults:
        """The faults the RELAY_TEST_* variables ask for (an unset or empty variable asks for none)."""
        env = os.environ if environ is None else environ

        def integer(name: str) -> int | None:
            text = env.get(name, "").strip()
            try:
                return int(text) if text else None
            except ValueError:
                raise FaultSettingInvalid(f"{name}: {text!r} is not a step number") from None

        def seconds(name: str) -> float:
            text = env.get(name, "").strip()
            try:
                return float(text) if text else 0.0
            except ValueError:
                raise FaultSettingInvalid(f"{name}: {text!r} is not a number of seconds") from None

        faults = cls(
            kill_after_step=integer(KILL_AFTER_STEP_ENV),
            sigterm_during_step=integer(SIGTERM_DURING_STEP_ENV),
            sigterm_during_eval=env.get(SIGTERM_DURING_EVAL_ENV) == "1",
            eval_batch_sleep_s=seconds(EVAL_BATCH_SLEEP_ENV),
            step_sleep_s=seconds(STEP_SLEEP_ENV),
            kill_in_checkpoint_write=integer(KILL_IN_WRITE_ENV),
            checkpoint_copy_delay_s=seconds(COPY_DELAY_ENV),
            checkpoint_write_delay_s=seconds(WRITE_DELAY_ENV),
        )
        if faults != cls():
            log.warning("test faults injected (RELAY_TEST_*; never in production): %s", faults.describe())
        return faults

    def describe(self) -> str:
        default = Faults()
        changed = [f for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in changed) or "none"

    # Hooks, in the order a leg meets them. Each is a no-op unless its variable is set.

    def during_step(self, step: int, micro_index: int) -> None:
        """After micro-batch `micro_index` (0 = the first) of optimizer step `step` (1-based)."""
        if micro_index == 0 and step == self.sigterm_during_step:
            os.kill(os.getpid(), signal.SIGTERM)  # lands mid-step: the loop must finish the step first

    def slow_step(self) -> None:
        """After each optimizer step, inside the step's timing."""
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)

    def after_step(self, step: int) -> None:
        """After step `step` is reported and before any checkpoint of it."""
        if step == self.kill_after_step:
            log.info("test hook %s: SIGKILL after step %d", KILL_AFTER_STEP_ENV, step)
            os.kill(os.getpid(), signal.SIGKILL)

    def during_eval(self) -> None:
        """Before the first evaluation batch."""
        if self.sigterm_during_eval:
            os.kill(os.getpid(), signal.SIGTERM)

    def after_eval_batch(self) -> None:
        """After each evaluation batch (the stop request is looked at before the next one)."""
        if self.eval_batch_sleep_s:
            time.sleep(self.eval_batch_sleep_s)

    def before_checkpoint_copy(self) -> None:
        """On the writer thread, before it copies a checkpoint's deferred tensors (a slow copy must still hold
        the state of its own step)."""
        if self.checkpoint_copy_delay_s:
            time.sleep(self.checkpoint_copy_delay_s)

    def in_checkpoint_write(self, step: int) -> None:
        """On the writer thread, inside the write of checkpoint `step`: after its first file, before its
        manifest (a drill SIGKILLs the trainer from outside during the delay)."""
        if self.checkpoint_write_delay_s:
            time.sleep(self.checkpoint_write_delay_s)
        if step == self.kill_in_checkpoint_write:
            log.info("test hook %s: SIGKILL inside the write of step %d", KILL_IN_WRITE_ENV, step)
            os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = Faults()
_active = NO_FAULTS


def active() -> Faults:
    """The running leg's faults (NO_FAULTS outside a leg): for the checkpoint writer thread."""
    return _active


@contextlib.contextmanager
def injected(faults: Faults) -> Iterator[Faults]:
    """Make `faults` the ones `active()` returns for the duration of the block (one leg)."""
    global _active
    previous, _active = _active, faults
    try:
        yield faults
    finally:
        _active = previous
