"""Attack tier, issue 11 item 1 (names are reused across objects): a run's folder belongs to its object's uid.

Findings: re-applying a deleted run's name with the same spec "resumed" the old finished model (Succeeded in
1 s); with a new spec it failed "config differs" showing Progress 100% on a brand-new object. prepare_run now
claims the folder for the TrainingRun's uid: a predecessor's folder is moved to runs/<ns>/.previous/ and named
in the result (the workflow turns it into a PreviousRunKept Event), and the new object starts from zero.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from controller.activities import RelayActivities
from controller.leg_model import LegHandle, LegObservation, LegSpec, LegState
from controller.messages import PrepareRunRequest, SnapshotResult
from controller.spec import DatasetSpec, TrainingRunSpec
from trainer.volume import RunLayout, atomic_write_json, checkpoint_dir_name, write_manifest
from trainer.volume.ownership import OWNER_FILE, claim_run_dir, read_owner_uid

SPEC = TrainingRunSpec(dataset=DatasetSpec(source="demo"))
SNAPSHOT = SnapshotResult(sha256="a", path="snapshots/a", rows={"train": 40}, fields=[], reused=False)


class NoLegs:
    """prepare_run touches no backend."""

    async def launch(self, leg: LegSpec) -> LegHandle:
        raise AssertionError("prepare_run launched a leg")

    async def observe(self, leg: LegSpec) -> LegObservation:
        return LegObservation(state=LegState.MISSING)

    async def wait_for_change(self, leg: LegSpec, timeout_s: float) -> LegObservation:
        return LegObservation(state=LegState.MISSING)

    async def stop(self, leg: LegSpec, grace_s: float) -> LegObservation:
        return LegObservation(state=LegState.MISSING)

    async def cleanup(self, namespace: str, name: str) -> None:
        return None


def _finished_run(volume: Path, step: int) -> RunLayout:
    """What a finished predecessor leaves: a checkpoint, a final model and leg records."""
    layout = RunLayout.for_run(volume, "ml", "bert")
    folder = layout.checkpoints_dir / checkpoint_dir_name(step)
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"w" * 64)
    write_manifest(folder, step=step, epoch=0, config_hash="h", metrics={"loss": 0.5})
    layout.final_dir.mkdir()
    layout.legs_dir.mkdir()
    (layout.legs_dir / "0.json").write_text("{}")
    return layout


async def _prepare(volume: Path, uid: str | None):
    request = PrepareRunRequest(namespace="ml", name="bert", spec=SPEC, snapshot=SNAPSHOT, owner_uid=uid)
    return await ActivityEnvironment().run(RelayActivities(NoLegs(), volume).prepare_run, request)


@pytest.mark.anyio
async def test_a_new_object_with_an_old_name_starts_from_zero_and_the_old_folder_is_kept(tmp_path: Path):
    """The same name after a delete: no checkpoint, no leg numbers, no final model of the predecessor."""
    layout = _finished_run(tmp_path, 100)
    atomic_write_json(layout.run_dir / OWNER_FILE, {"uid": "old-uid-1234"})  # the predecessor's
    first = await _prepare(tmp_path, "new-uid-5678")
    assert first.latest_checkpoint is None and first.next_leg == 0
    assert first.previous_run_path is not None
    assert re.fullmatch(r"runs/ml/\.previous/bert-old-uid--\d{8}T\d{6}Z", first.previous_run_path)
    kept = tmp_path / first.previous_run_path
    assert (kept / "final").is_dir() and read_owner_uid(kept) == "old-uid-1234"
    assert read_owner_uid(layout.run_dir) == "new-uid-5678" and not layout.final_dir.exists()
    again = await _prepare(tmp_path, "new-uid-5678")  # the same object again (a retried activity): kept as is
    assert again.previous_run_path is None and (layout.run_dir / OWNER_FILE).is_file()


def test_folders_without_an_owner_are_moved_aside_and_empty_ones_claimed(tmp_path: Path):
    """A folder written before owners were recorded is a predecessor's too; an empty one is simply claimed."""
    layout = _finished_run(tmp_path, 5)
    moved = claim_run_dir(layout.run_dir, "uid-a", now=0)
    assert moved == layout.run_dir.parent / ".previous" / "bert-unowned-19700101T000000Z"
    empty = tmp_path / "runs/ml/empty"
    empty.mkdir(parents=True)
    assert claim_run_dir(empty, "uid-b") is None and read_owner_uid(empty) == "uid-b"
    assert claim_run_dir(tmp_path / "runs/ml/absent", "uid-c") is None
    assert read_owner_uid(tmp_path / "runs/ml/absent") == "uid-c"
    elsewhere = tmp_path / "runs/other/theirs"
    elsewhere.mkdir(parents=True)
    (tmp_path / "runs/ml/linked").symlink_to(elsewhere)  # a folder that is a symlink is not followed
    moved = claim_run_dir(tmp_path / "runs/ml/linked", "uid-d", now=0)
    assert moved is not None and moved.is_symlink() and not (elsewhere / OWNER_FILE).exists()
    assert read_owner_uid(tmp_path / "runs/ml/linked") == "uid-d"


@pytest.mark.anyio
async def test_a_run_without_an_owner_uid_keeps_its_folder(tmp_path: Path):
    """`relay run` (no TrainingRun object, no uid) resumes its own folder as before."""
    _finished_run(tmp_path, 7)
    result = await _prepare(tmp_path, None)
    assert result.previous_run_path is None and result.latest_checkpoint is not None
    assert result.latest_checkpoint.step == 7
