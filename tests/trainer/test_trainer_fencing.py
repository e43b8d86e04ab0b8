"""Fencing (issue 13): two real trainers on one run folder, the newer generation wins.

The controller writes fence.json before each launch; a trainer started with `--generation N` re-reads it before
every commit. Here the fence is moved by hand (volume.write_fence, as the controller does) while the older
trainer keeps running: it must exit with ExitCode.FENCED and "fenced: leg 7 superseded by leg 8", commit
nothing after the fence moved, and the newer one must end with the uninterrupted run's weights.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from trainer_helpers import REPO, run_train, sha256, train_command, trainer_env, write_config

from trainer.volume import (
    ExitCode,
    RunLayout,
    find_latest_checkpoint,
    read_fence,
    read_history,
    read_progress,
    remove_stale_temp_dirs,
    select_for_deletion,
    write_fence,
)
from trainer.volume.fencing import Fence, Fenced, guarding

FENCED_MESSAGE = "fenced: leg 7 superseded by leg 8"


def start_leg(run_dir: Path, snapshot: Path, config: Path, generation: int, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*train_command(run_dir, snapshot, config), "--generation", str(generation)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=trainer_env(**env),
        cwd=REPO,
    )


def wait_for(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def newest_step(layout: RunLayout) -> int | None:
    latest, _ = find_latest_checkpoint(layout.checkpoints_dir, verify_hashes=False)
    return latest.step if latest else None


def commits_after(layout: RunLayout, pid: int, since: float) -> list[str]:
    """What process `pid` committed after `since`: history lines, and progress.json when it is its report."""
    found = [f"history step {e.step} {e.event or ''}" for e in read_history(layout) if e.pid == pid and e.time > since]
    progress = read_progress(layout)
    if progress and progress["pid"] == pid and progress["updated_at"] > since:
        found.append(f"progress.json step {progress['step']}")
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, snapshot: Path) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(folder / "config.json")
    result = run_train(folder / "run", snapshot, config)
    assert result.returncode == ExitCode.COMPLETE, result.stderr
    return folder / "run" / "final" / "model.safetensors"


def test_the_newer_generation_wins_and_the_older_commits_nothing_after_the_fence_moved(
    uninterrupted: Path, snapshot: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.json")
    layout = RunLayout(tmp_path / "run")
    write_fence(layout, 7, None)
    old = start_leg(layout.run_dir, snapshot, config, 7, RELAY_TEST_STEP_SLEEP_S="0.15")
    try:
        wait_for(lambda: newest_step(layout) is not None, "leg 7's first checkpoint")
        moved = write_fence(layout, 8, newest_step(layout))  # what launch_leg does before starting leg 8
        new = start_leg(layout.run_dir, snapshot, config, 8)
        _, old_err = old.communicate(timeout=60)
        _, new_err = new.communicate(timeout=120)
    finally:
        old.kill()
    assert old.returncode == ExitCode.FENCED, old_err
    assert FENCED_MESSAGE in old_err
    assert new.returncode == ExitCode.COMPLETE, new_err
    assert commits_after(layout, old.pid, moved.written_at) == []
    assert sha256(layout.final_dir / "model.safetensors") == sha256(uninterrupted)


def test_an_older_trainer_paused_inside_a_checkpoint_write_is_fenced_at_the_rename(
    uninterrupted: Path, snapshot: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.json")
    layout = RunLayout(tmp_path / "run")
    write_fence(layout, 7, None)
    # Leg 7 sleeps inside its first checkpoint write, after the first file and before the manifest.
    old = start_leg(layout.run_dir, snapshot, config, 7, RELAY_TEST_CHECKPOINT_WRITE_DELAY_S="4")
    try:
        temp_of_7 = lambda: [p for p in layout.checkpoints_dir.glob(".tmp-g7-step-*")]  # noqa: E731
        wait_for(lambda: layout.checkpoints_dir.is_dir() and temp_of_7(), "leg 7 inside its checkpoint write")
        moved = write_fence(layout, 8, None)  # at this very moment leg 8 is launched, from no checkpoint
        new = start_leg(layout.run_dir, snapshot, config, 8)
        _, old_err = old.communicate(timeout=60)
        _, new_err = new.communicate(timeout=120)
    finally:
        old.kill()
    assert old.returncode == ExitCode.FENCED, old_err
    assert FENCED_MESSAGE in old_err
    assert new.returncode == ExitCode.COMPLETE, new_err
    assert commits_after(layout, old.pid, moved.written_at) == []
    assert "start: fresh run" in new_err  # leg 7's step 10 was never committed for leg 8 to resume from
    assert not temp_of_7()
    assert sha256(layout.final_dir / "model.safetensors") == sha256(uninterrupted)


def test_a_leg_started_after_a_newer_one_was_launched_exits_fenced_at_once(snapshot: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.json")
    layout = RunLayout(tmp_path / "run")
    write_fence(layout, 8, None)
    leg = start_leg(layout.run_dir, snapshot, config, 7)
    _, err = leg.communicate(timeout=60)
    assert leg.returncode == ExitCode.FENCED, err
    assert FENCED_MESSAGE in err
    assert not layout.progress_path.exists() and not layout.history_path.exists()


def test_a_symlinked_fence_file_is_refused_naming_it(snapshot: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.json")
    layout = RunLayout(tmp_path / "run")
    layout.run_dir.mkdir()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"generation": 0}', encoding="utf-8")
    layout.fence_path.symlink_to(elsewhere)
    leg = start_leg(layout.run_dir, snapshot, config, 3)
    _, err = leg.communicate(timeout=60)
    assert leg.returncode == ExitCode.INVALID_INPUT, err
    assert f"{layout.fence_path} is a symlink (never followed)" in err
    # The controller's write replaces the link instead of writing through it.
    write_fence(layout, 4, None)
    assert not layout.fence_path.is_symlink()
    assert elsewhere.read_text(encoding="utf-8") == '{"generation": 0}'
    assert read_fence(layout) is not None and read_fence(layout).generation == 4  # type: ignore[union-attr]


def test_stale_temp_cleanup_leaves_a_newer_generations_temp_folder_alone(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    names = [".tmp-g6-step-000000010.1.2", ".tmp-step-000000010.3.4", ".tmp-g7-step-000000020.5.6"]
    names += [".tmp-g9-step-000000030.7.8", ".tmp-g6-delete-step-000000005.9"]
    for name in names:
        (layout.checkpoints_dir / name).mkdir(parents=True)
    removed = remove_stale_temp_dirs(layout.checkpoints_dir, generation=7)
    assert sorted(p.name for p in removed) == sorted([names[0], names[1], names[4]])
    assert sorted(p.name for p in layout.checkpoints_dir.iterdir()) == sorted([names[2], names[3]])


def test_cleanup_refuses_to_delete_once_superseded(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    (layout.checkpoints_dir / ".tmp-g1-step-000000010.1.2").mkdir(parents=True)
    write_fence(layout, 5, None)
    with guarding(Fence(layout, 4)), pytest.raises(Fenced, match="fenced: leg 4 superseded by leg 5"):
        remove_stale_temp_dirs(layout.checkpoints_dir, generation=4)
    assert (layout.checkpoints_dir / ".tmp-g1-step-000000010.1.2").is_dir()


def test_retention_keeps_the_step_the_newest_leg_resumed_from(tmp_path: Path) -> None:
    from trainer.volume import CheckpointInfo

    infos = [CheckpointInfo(tmp_path / f"s{n}", n, 0, 0.0, "h", {"loss": 1.0 / n}, (), {}) for n in (10, 20, 30, 40)]
    layout = RunLayout(tmp_path / "run")
    write_fence(layout, 3, 20)
    fence = Fence(layout, 3)
    kept_unfenced = {c.step for c in infos} - {c.step for c in select_for_deletion(infos, keep_last=1)}
    deleted = select_for_deletion(infos, keep_last=1, protected=fence.protected_steps())
    assert kept_unfenced == {40}
    assert [c.step for c in deleted] == [10, 30]


def test_the_fence_never_goes_back_and_a_missing_one_fences_nothing(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    assert Fence(layout, 2).check("start") is None  # a run from before fencing
    write_fence(layout, 5, 40)
    assert write_fence(layout, 4, None).generation == 5
    assert read_fence(layout) == write_fence(layout, 5, 40)
    assert Fence(layout, None).check("commit") is None  # a trainer run by hand without --generation
    assert not Fence(layout, 5).superseded() and Fence(layout, 4).superseded()
    assert os.path.isfile(layout.fence_path)
