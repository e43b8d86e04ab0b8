"""The drill's overlap rule for node-lost (issue 13): legs may overlap only when the older one ended fenced.

A cut-off leg's trainer runs on after the next leg starts; the drill's "legs never overlapped" check allows that
overlap only when the old trainer exited 76 (fenced) and committed nothing after the fence moved (late_commits:
its history lines and progress.json by pid, checkpoint folders by the time they were renamed into place).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controller.drill import FAULTS, OPT_IN_FAULTS, run_drill
from controller.drill.core import NODE_LOST_S, Drill, FencedLeg, fence_moved_at, late_commits, run_document
from trainer.volume import HistoryEntry, RunLayout, append_history, write_progress
from trainer.volume.fencing import write_fence

SPANS: list[tuple[str, float | None, float | None]] = [
    ("drill-leg-0", 100.0, 131.5),  # cut off at 125: ran on until fenced at 131.5
    ("drill-leg-1", 131.0, 160.0),
    ("drill-leg-2", 160.5, 170.0),
]


def test_a_fenced_leg_may_overlap_the_next_and_the_report_says_why() -> None:
    fenced = {"drill-leg-0": FencedLeg(exit_code=76, fence_moved_at=130.0, newer=1)}
    check = Drill.spans_disjoint("legs", SPANS, fenced)
    assert check.ok, check.detail
    assert "drill-leg-1 began 0.500s before drill-leg-0 ended (allowed: drill-leg-0 fenced" in check.detail


def test_an_unfenced_overlap_fails() -> None:
    check = Drill.spans_disjoint("legs", SPANS)
    assert not check.ok
    assert check.detail == "drill-leg-1 began 0.500s before drill-leg-0 ended"
    # Fenced legs excuse only their own overlap: leg 1 overlapping leg 2 still fails.
    spans = [*SPANS[:2], ("drill-leg-2", 159.0, 170.0)]
    check = Drill.spans_disjoint("legs", spans, {"drill-leg-0": FencedLeg(76, 130.0, 1)})
    assert not check.ok and "drill-leg-2 began 1.000s before drill-leg-1 ended" in check.detail


def test_a_cut_off_leg_that_committed_late_or_was_not_fenced_fails() -> None:
    late = {"drill-leg-0": FencedLeg(76, 130.0, 1, late=["checkpoint step-000000040 at +0.200s"])}
    check = Drill.spans_disjoint("legs", SPANS, late)
    assert not check.ok
    assert "not cleanly fenced (late: checkpoint step-000000040 at +0.200s)" in check.detail
    killed = {"drill-leg-0": FencedLeg(137, 130.0, 1)}
    check = Drill.spans_disjoint("legs", SPANS, killed)
    assert not check.ok and "not cleanly fenced (exit 137)" in check.detail


def test_late_commits_names_what_the_old_generation_wrote_after_the_fence(tmp_path: Path) -> None:
    layout = RunLayout.for_run(tmp_path, "ns", "drill")
    layout.checkpoints_dir.mkdir(parents=True)
    old_pid, new_pid = 4242, 4343
    (layout.checkpoints_dir / "step-000000010").mkdir()  # committed before the fence: fine
    append_history(layout, HistoryEntry(step=10, time=time.time(), pid=old_pid))
    time.sleep(0.05)
    write_fence(layout, 1, 10)
    generation, moved_at = fence_moved_at(layout) or (None, 0.0)
    assert generation == 1
    assert late_commits(layout, old_pid, moved_at, None) == []

    time.sleep(0.05)  # the old trainer carries on, unfenced (as if its check had been skipped)
    append_history(layout, HistoryEntry(step=11, time=time.time(), pid=old_pid))
    write_progress(layout, {"state": "running", "step": 11, "pid": old_pid})
    tmp = layout.checkpoints_dir / ".tmp-g0-step-000000020"
    tmp.mkdir()
    tmp.rename(layout.checkpoints_dir / "step-000000020")
    append_history(layout, HistoryEntry(step=12, time=time.time(), pid=new_pid))  # the new leg's: not the old one's
    late = late_commits(layout, old_pid, moved_at, None)
    assert [item.split(" at ")[0] for item in late] == [
        "history.jsonl step 11",
        "progress.json step 11",
        "checkpoint step-000000020",
    ]
    # A checkpoint renamed after a newer trainer started may be that trainer's own: not counted against the old.
    assert late_commits(layout, old_pid, moved_at, others_from=moved_at + 0.01)[:2] == late[:2]
    assert len(late_commits(layout, old_pid, moved_at, others_from=moved_at + 0.01)) == 2


def test_run_drill_refuses_node_lost_on_the_local_backend(capsys: Any) -> None:
    code, result = run_drill(5, 1, None, ("node-lost",), "local")
    assert (code, result) == (2, None)
    error = capsys.readouterr().err
    assert "--kinds: 'node-lost' needs a node: the local backend has none" in error and "stalled-leg" in error


def test_node_lost_is_opt_in_and_sets_the_node_lost_limit_only_then() -> None:
    assert "node-lost" in OPT_IN_FAULTS
    assert all("node-lost" not in kinds for kinds in FAULTS.values())  # the seeded default plans stay as they were
    assert run_document("ns", 50, node_lost_s=NODE_LOST_S)["spec"]["retries"]["nodeLostAfterSeconds"] == NODE_LOST_S
    assert "nodeLostAfterSeconds" not in run_document("ns", 50)["spec"]["retries"]


@pytest.mark.parametrize(
    ("backend", "words"),
    [
        ("local", "--kinds: 'node-lost' needs a node: the local backend has none (its analogue is stalled-leg"),
        ("kubernetes", "--kinds: 'node-lost' needs a node harness that can cut a node off from the API server"),
    ],
)
def test_relay_drill_refuses_node_lost_without_a_node_to_cut_off(backend: str, words: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", "drill", "--volume", str(tmp_path), "--backend", backend,
         "--kinds", "node-lost"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
