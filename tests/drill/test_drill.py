"""`relay drill` end to end: a short seeded drill (4 real faults) through the real CLI passes all its checks.

The drill's own checks are the assertions a user relies on (Succeeded, same weights as an uninterrupted
run, no overlapping legs, no orphans, quarantines reported); this test also checks the table matches the
seed's plan, every fault recovered and each fault kind left its own evidence.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controller.drill import ALL_FAULTS, Check, DrillResult, FaultRecord, format_result, plan, steps_for


@pytest.mark.slow
def test_short_drill_passes_every_check(short_drill: Any) -> None:
    """The session's short drill (tests/conftest.py: seed 20, 4 faults)."""
    code, text, run_dir = short_drill.exit_code, short_drill.output, short_drill.run_dir
    assert code == 0, text[-4000:]
    kinds = ALL_FAULTS if "enospc not injected" not in text else tuple(k for k in ALL_FAULTS if k != "enospc")
    expected = [f.kind for f in plan(short_drill.seed, short_drill.faults, kinds)]
    rows = [
        line.split() for line in text.splitlines() if line[:2].strip().isdigit() and line[4:].split()[0] in ALL_FAULTS
    ]
    assert [row[1] for row in rows] == expected, text
    for row in rows:
        assert row[4] != "FAILED" and row[4].endswith("s"), row  # recovered, with a recovery time
        assert 0 <= int(row[5]) <= 20, row  # never more than two checkpoint intervals lost
    by_kind = {line.split()[1]: line for line in text.splitlines() if line[:2].strip().isdigit()}
    assert "half-written folder left" in by_kind["sigkill-in-write"]
    assert "then SIGKILL" in by_kind["corrupt-newest"]
    assert "worker reconnected" in by_kind["server-restart"]
    assert by_kind["server-restart"].split()[5] == "0"  # the leg trained on while the server was down
    if "enospc" in kinds:
        assert "failed with ENOSPC" in by_kind["enospc"]
    for check in ("run Succeeded", "final weights == uninterrupted run", "legs never overlapped",
                  "trainer processes never overlapped", "no orphaned processes",
                  "every quarantined checkpoint in status and events"):  # fmt: skip
        assert f"PASS  {check}" in text, text
    assert "FAIL " not in text and "drill PASSED" in text
    assert any((run_dir / "quarantine").iterdir())  # the corrupted checkpoint was set aside


def test_the_plan_is_reproducible_from_the_seed() -> None:
    assert plan(7, 25, ALL_FAULTS) == plan(7, 25, ALL_FAULTS)
    assert plan(7, 25, ALL_FAULTS) != plan(8, 25, ALL_FAULTS)
    assert {f.kind for f in plan(1, 25, ALL_FAULTS)} == set(ALL_FAULTS)
    faults = plan(3, 10, ALL_FAULTS)
    assert all(21 <= f.gap <= 30 for f in faults)  # two checkpoints (every 10 steps) between faults
    assert steps_for(faults) > sum(f.gap for f in faults) + 20


def test_a_failed_check_or_an_unrecovered_fault_fails_the_drill() -> None:
    good = FaultRecord("sigkill", 25, 25, 25, 4.2, 5, "leg 0")
    passing = DrillResult([good], [Check("run Succeeded", True, "ok")])
    assert passing.passed and "drill PASSED" in format_result(passing)
    failing = DrillResult([good], [Check("final weights == uninterrupted run", False, "sha256 a vs b")])
    assert not failing.passed
    assert "FAIL  final weights == uninterrupted run: sha256 a vs b" in format_result(failing)
    unrecovered = DrillResult([FaultRecord("sigkill", 25, 25, 25)], [Check("run Succeeded", True, "ok")])
    assert not unrecovered.passed and "FAILED" in format_result(unrecovered)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--faults", "0"], "--faults: must be at least 1"),
        (["--kinds", "sigkill,meteor"], "unknown fault 'meteor'"),
        (["--backend", "kubernetes", "--kinds", "worker-restart"], "unknown fault 'worker-restart' for the kubernetes"),
        (["--backend", "kubernetes", "--kubeconfig", "/nonexistent"], "--kubeconfig /nonexistent: no such file"),
        (["--backend", "kubernetes", "--kinds", "corrupt-newest"], "'corrupt-newest' needs the trainer's process"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], words: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", "drill", "--volume", str(tmp_path), *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "KUBEBUILDER_ASSETS": "/nonexistent"},
    )  # fmt: skip
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "volume").exists()
