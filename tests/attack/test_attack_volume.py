"""Attack tier, issue 11 item 2 (confinement): nothing a run's pod plants, and no path a spec names, makes the
controller write or read outside the namespace's own part of the volume.

Findings: a symlink `runs/<ns>/<run>/.tmp-config.json.<pid>` planted by the run's own pod (it mounts its run folder
read-write) pointing at another namespace's `final/config.json` made the controller overwrite that file;
`dataset.path: runs/other-ns/other-run/private.csv` snapshotted another namespace's data; `relay predict --model
runs/other-ns/...` predicted with another namespace's model. Durable writes now walk folders with O_NOFOLLOW dir fds
and make temp files with O_EXCL (trainer.volume.durable); reads are checked by trainer.volume.tenancy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from controller.activities import RelayActivities
from controller.messages import PredictRequest, PrepareRunRequest, SnapshotRequest, SnapshotResult
from controller.snapshot import write_rows_file
from controller.spec import DatasetSpec, TrainingRunSpec
from trainer.volume import RunLayout, atomic_write_json, read_json, read_termination_message, write_termination_message
from trainer.volume.durable import SymlinkRefused
from trainer.volume.tenancy import ForeignPath, check_namespace_read

SPEC = TrainingRunSpec(dataset=DatasetSpec(source="demo"))
SNAPSHOT = SnapshotResult(sha256="a", path="snapshots/a", rows={"train": 40}, fields=[], reused=False)
VICTIM = {"victim": True}


def _victim_file(root: Path) -> Path:
    target = RunLayout.for_run(root, "other-ns", "other-run").final_dir / "config.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(VICTIM), encoding="utf-8")
    return target


def _activities(root: Path) -> RelayActivities:
    return RelayActivities(object(), root)  # type: ignore[arg-type]  # these activities reach no backend


@pytest.mark.anyio
async def test_a_planted_temp_symlink_does_not_make_the_controller_overwrite_another_namespaces_file(tmp_path: Path):
    victim = _victim_file(tmp_path)
    layout = RunLayout.for_run(tmp_path, "ml", "r")
    layout.run_dir.mkdir(parents=True)
    (layout.run_dir / f".tmp-config.json.{os.getpid()}").symlink_to(victim)
    request = PrepareRunRequest(namespace="ml", name="r", spec=SPEC, snapshot=SNAPSHOT)
    await ActivityEnvironment().run(_activities(tmp_path).prepare_run, request)
    assert json.loads(victim.read_text(encoding="utf-8")) == VICTIM
    assert not layout.config_path.is_symlink() and read_json(layout.config_path)["model"] == SPEC.model


def test_a_planted_symlink_at_the_final_name_is_replaced_never_written_through(tmp_path: Path):
    victim = _victim_file(tmp_path)
    run_dir = RunLayout.for_run(tmp_path, "ml", "r").run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "progress.json").symlink_to(victim)
    atomic_write_json(run_dir / "progress.json", {"state": "running"})
    assert json.loads(victim.read_text(encoding="utf-8")) == VICTIM
    assert not (run_dir / "progress.json").is_symlink()


def test_a_symlinked_folder_inside_a_run_folder_is_refused_for_writes_and_reads(tmp_path: Path):
    victim = _victim_file(tmp_path)
    layout = RunLayout.for_run(tmp_path, "ml", "r")
    layout.run_dir.mkdir(parents=True)
    layout.legs_dir.symlink_to(victim.parent)  # legs/ -> the other namespace's final/
    with pytest.raises(SymlinkRefused, match="legs"):
        atomic_write_json(layout.leg_record_path(0), {"leg": 0})
    assert sorted(p.name for p in victim.parent.iterdir()) == ["config.json"]
    with pytest.raises(SymlinkRefused, match="legs"):
        read_json(layout.legs_dir / "config.json")
    (layout.run_dir / "progress.json").symlink_to(victim)
    with pytest.raises(SymlinkRefused, match=r"progress\.json"):
        read_json(layout.run_dir / "progress.json")


@pytest.mark.parametrize(
    ("relative", "allowed"),
    [
        ("runs/ml/r/final", True),
        ("data/ml/reviews.csv", True),
        ("models/ml/bert", True),
        ("datasets/reviews.csv", True),  # the operator's shared area (README, examples)
        ("runs/other-ns/other-run/private.csv", False),
        ("data/other-ns/reviews.csv", False),
        ("models/other-ns/bert", False),
        ("runs/ml-other/r/final", False),
        ("runs", False),
        ("snapshots/abc/data/train/data-00000-of-00001.arrow", False),
        ("../etc/hostname", False),
    ],
)
def test_a_namespace_reads_only_its_own_prefixes_and_the_shared_area(relative: str, allowed: bool):
    if allowed:
        check_namespace_read("ml", relative, "dataset.path")
    else:
        with pytest.raises(ForeignPath, match=r"^dataset\.path "):
            check_namespace_read("ml", relative, "dataset.path")


async def _snapshot(root: Path, path: str) -> Any:
    request = SnapshotRequest(
        namespace="ml", name="r", dataset=DatasetSpec(source="csv", path=path, eval_fraction=0.25), num_labels=2
    )
    return await ActivityEnvironment().run(_activities(root).snapshot_dataset, request)


@pytest.mark.anyio
async def test_a_dataset_path_into_another_namespace_is_refused_before_any_read(tmp_path: Path):
    private = tmp_path / "runs/other-ns/other-run/private.csv"
    write_rows_file(private, ["secret one", "secret two", "secret three", "secret four"], [0, 1, 0, 1])
    with pytest.raises(ApplicationError) as refused:
        await _snapshot(tmp_path, "runs/other-ns/other-run/private.csv")
    assert refused.value.non_retryable and refused.value.type == "InvalidDataset"
    assert refused.value.message.startswith("dataset.path 'runs/other-ns/other-run/private.csv': namespace 'ml'")
    assert not (tmp_path / "snapshots").exists() or not any((tmp_path / "snapshots").iterdir())
    # The same file reached through a link in the namespace's own folder is refused too (symlinks resolved first).
    (tmp_path / "data/ml").mkdir(parents=True)
    (tmp_path / "data/ml/mine.csv").symlink_to(private)
    with pytest.raises(ApplicationError, match=r"where 'data/ml/mine.csv' leads"):
        await _snapshot(tmp_path, "data/ml/mine.csv")
    write_rows_file(tmp_path / "data/ml/own.csv", ["good", "bad", "fine", "poor"], [1, 0, 1, 0])
    assert (await _snapshot(tmp_path, "data/ml/own.csv")).rows == {"train": 3, "eval": 1}


@pytest.mark.anyio
async def test_predict_with_another_namespaces_model_is_refused_before_any_job(tmp_path: Path):
    (tmp_path / "runs/other-ns/other-run/final").mkdir(parents=True)
    request = PredictRequest(namespace="ml", name="r", texts=["x"], model_path="runs/other-ns/other-run/final")
    with pytest.raises(ApplicationError) as refused:  # the backend is a bare object: a Job would raise otherwise
        await ActivityEnvironment().run(_activities(tmp_path).predict, request)
    assert refused.value.non_retryable and refused.value.type == "PredictFailed"
    assert refused.value.message.startswith("modelPath 'runs/other-ns/other-run/final': namespace 'ml' reads only")


@pytest.mark.anyio
async def test_training_from_another_namespaces_model_is_refused(tmp_path: Path):
    (tmp_path / "models/other-ns/bert").mkdir(parents=True)
    spec = SPEC.model_copy(update={"model": "models/other-ns/bert"})
    request = PrepareRunRequest(namespace="ml", name="r", spec=spec, snapshot=SNAPSHOT)
    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(_activities(tmp_path).prepare_run, request)
    assert refused.value.non_retryable and refused.value.message.startswith("spec.model 'models/other-ns/bert'")
    assert not RunLayout.for_run(tmp_path, "ml", "r").config_path.exists()


def test_a_planted_termination_log_link_is_neither_read_nor_written_through(tmp_path: Path):
    """The local supervisor's legs/<n>.termination-log lies in the run folder the leg can write."""
    victim = _victim_file(tmp_path)
    legs = RunLayout.for_run(tmp_path, "ml", "r").legs_dir
    legs.mkdir(parents=True)
    (legs / "0.termination-log").symlink_to(victim)
    assert read_termination_message(legs / "0.termination-log") == ""
    assert write_termination_message("boom", legs / "0.termination-log") is False
    assert json.loads(victim.read_text(encoding="utf-8")) == VICTIM
