"""`relay drill --kinds stalled-leg` (issue 13): asked for by name only, the default mixes and their seeded plans
stay as they were; the run gets retries.progressStallSeconds only when the fault is in the mix. The full
stalled-leg drill (SIGSTOP, the backend's ProgressStalled kill, resume to the uninterrupted weights) takes ~100 s:
run `relay drill --kinds stalled-leg --faults 1`; the backend side is tests/local/test_stalled_leg.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from controller.drill import ALL_FAULTS, FAULTS, OPT_IN_FAULTS
from controller.drill.core import STALL_S, run_document


def test_stalled_leg_is_opt_in_and_sets_the_stall_limit_only_then() -> None:
    assert "stalled-leg" in OPT_IN_FAULTS
    assert all("stalled-leg" not in kinds for kinds in (ALL_FAULTS, *FAULTS.values()))
    assert run_document("default", 50, STALL_S)["spec"]["retries"]["progressStallSeconds"] == STALL_S
    assert "progressStallSeconds" not in run_document("default", 50)["spec"]["retries"]


def test_stalled_leg_needs_the_trainers_process_on_kubernetes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", "drill", "--volume", str(tmp_path), "--backend", "kubernetes",
         "--kinds", "stalled-leg"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "KUBEBUILDER_ASSETS": "/nonexistent"},
    )  # fmt: skip
    assert result.returncode == 2 and "unknown fault 'stalled-leg' for the kubernetes" in result.stderr
