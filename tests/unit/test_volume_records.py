"""The volume's typed records: progress.json, history.jsonl lines and legs/<n>.json, written with one spelling
per field and read back from files as every writer so far left them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.status import LegStatus
from trainer.volume import (
    HistoryEntry,
    LegRecord,
    Progress,
    RunLayout,
    append_history,
    load_progress,
    read_history,
    read_leg_record,
    read_leg_records,
    read_progress,
    write_leg_record,
    write_progress,
)


def test_progress_round_trip_with_one_spelling(tmp_path: Path) -> None:
    layout = RunLayout.for_run(tmp_path, "ns", "run")
    written = write_progress(layout, Progress(state="running", step=7, total_steps=10, samples_per_s=3.5, eta_s=2.0))
    on_disk = json.loads(layout.progress_path.read_text())
    assert on_disk["samples_per_s"] == 3.5 and on_disk["eta_s"] == 2.0 and on_disk["updated_at"] == written.updated_at
    assert "samples_per_second" not in on_disk and "eta_seconds" not in on_disk
    assert load_progress(layout) == written


def test_progress_written_under_the_older_spellings_reads_the_same(tmp_path: Path) -> None:
    layout = RunLayout.for_run(tmp_path, "ns", "run")
    layout.run_dir.mkdir(parents=True)
    old = {"state": "running", "step": 4, "samples_per_second": 12.5, "eta_seconds": 30, "future_key": True}
    layout.progress_path.write_text(json.dumps(old))
    progress = load_progress(layout)
    assert progress is not None and progress.samples_per_s == 12.5 and progress.eta_s == 30.0 and progress.step == 4
    assert read_progress(layout) == progress.model_dump(mode="json")


def test_progress_that_does_not_parse_reads_as_none(tmp_path: Path) -> None:
    layout = RunLayout.for_run(tmp_path, "ns", "run")
    layout.run_dir.mkdir(parents=True)
    for text in ("{", '{"state": "dancing"}', "[1, 2]"):
        layout.progress_path.write_text(text)
        assert load_progress(layout) is None and read_progress(layout) is None
    with pytest.raises(ValueError, match="state"):
        write_progress(layout, {"state": "dancing"})


def test_history_lines_round_trip_and_a_cut_line_is_skipped(tmp_path: Path) -> None:
    layout = RunLayout.for_run(tmp_path, "ns", "run")
    layout.run_dir.mkdir(parents=True)
    append_history(layout, HistoryEntry(step=0, time=1.0, pid=9, event="start", total_steps=20))
    append_history(layout, HistoryEntry(step=10, time=2.0, pid=9, loss=0.5, samples_per_s=4.0))
    with open(layout.history_path, "a", encoding="utf-8") as handle:  # a line the trainer wrote before records
        handle.write('{"epoch": 1.0, "eval_accuracy": 0.75, "eval_loss": 0.4, "pid": 9, "step": 20, "time": 3.0}\n')
        handle.write('{"step": 21, "ti')  # SIGKILL in the middle of a line
    entries = read_history(layout)
    assert [e.step for e in entries] == [0, 10, 20]
    assert entries[0].event == "start" and entries[0].resumed_from is None and entries[1].loss == 0.5
    assert entries[2].eval_accuracy == 0.75
    first = json.loads(layout.history_path.read_text().splitlines()[0])
    assert first == {"event": "start", "pid": 9, "step": 0, "time": 1.0, "total_steps": 20}  # no null fields


def test_leg_records_are_the_status_model_on_disk(tmp_path: Path) -> None:
    layout = RunLayout.for_run(tmp_path, "ns", "run")
    assert LegStatus is LegRecord
    write_leg_record(layout, LegRecord(leg=1, start_step=10, started_at="2026-01-02T03:04:05Z", backend_id="pid:4"))
    write_leg_record(layout, LegRecord(leg=0, end_step=10, outcome="preempted"))
    (layout.legs_dir / "2.pid.json").write_text("{}")  # a local supervisor's record: not a leg record
    (layout.legs_dir / "3.json").write_text("{")  # unreadable: skipped
    on_disk = json.loads(layout.leg_record_path(1).read_text())
    assert on_disk["startStep"] == 10 and on_disk["backendId"] == "pid:4"
    assert [r.leg for r in read_leg_records(layout)] == [0, 1]
    assert read_leg_record(layout, 0) == LegRecord(leg=0, end_step=10, outcome="preempted")
    assert read_leg_record(layout, 5) is None
