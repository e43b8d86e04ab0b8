"""Attack tier, issue 11 item 6 (trainer integrity): what lies in a run folder cannot steer the trainer elsewhere
or stop the run for good.

Findings, reproduced on the trainer command: a manifest listing `../../../evil` or `/etc/hostname` (with correct
hashes) was verified and used, and a bogus `step-999999998` then took a keepLast slot and every later leg resumed
from it; symlinked checkpoint files were followed; one changed character of the newest manifest's config_hash
stopped the run for good with exit 65 and "(fields: )"; a run dir that is a file, or is not writable, gave a
traceback with exit 1 and nothing in RELAY_TERMINATION_LOG. Now every such checkpoint is quarantined and the
previous one used (the run still ends bit-identical), and run-dir problems exit 65 with one line naming the path.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import xxhash

from tests.trainer.trainer_helpers import build_snapshot, make_rows, sha256, write_config
from trainer.__main__ import main
from trainer.train import run_dir_problem
from trainer.volume import (
    TERMINATION_LOG_ENV,
    CheckpointInvalid,
    ExitCode,
    RunLayout,
    list_quarantined,
    read_checkpoint,
    write_manifest,
)

SETTINGS = {"maxSteps": 12, "checkpointEverySteps": 3, "keepLast": 10}
NEWEST, PREVIOUS = "step-000000012", "step-000000009"


def train(run_dir: Path, snapshot: Path, config: Path) -> int:
    return main(["train", "--run-dir", str(run_dir), "--snapshot", str(snapshot), "--config", str(config)])


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("snapshot")
    return build_snapshot(folder, {"train": make_rows(160, seed=1), "eval": make_rows(48, seed=2)})


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, snapshot: Path) -> Path:
    """A finished 12-step run with a checkpoint every 3 steps, all kept."""
    folder = tmp_path_factory.mktemp("reference")
    assert train(folder / "run", snapshot, write_config(folder / "config.json", **SETTINGS)) == ExitCode.COMPLETE
    return folder / "run"


def unfinished_copy(reference: Path, tmp_path: Path) -> RunLayout:
    """The reference run as if its last leg had died after its last checkpoint."""
    shutil.copytree(reference, tmp_path / "run", symlinks=True)
    shutil.rmtree(tmp_path / "run" / "final")
    return RunLayout(tmp_path / "run")


def resume(layout: RunLayout, snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """One leg on the tampered run: it must end complete; returns its log."""
    capsys.readouterr()
    code = train(layout.run_dir, snapshot, write_config(tmp_path / "config.json", **SETTINGS))
    log = capsys.readouterr().err
    assert code == ExitCode.COMPLETE, log[-2000:]
    return log


def edit_manifest(folder: Path, **changes: object) -> dict[str, object]:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return manifest


@pytest.mark.parametrize("outside", ["../../../evil", "/etc/hostname", "sub/../../x", "./model.bin", ""])
def test_a_manifest_entry_that_is_not_a_plain_name_in_the_folder_is_invalid(tmp_path: Path, outside: str):
    folder = tmp_path / "checkpoints" / "step-000000001"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"weights")
    write_manifest(folder, step=1, epoch=0, config_hash="c")
    (folder / "sub").rmdir()
    target = Path(outside) if outside.startswith("/") else folder / outside
    if outside and not outside.startswith("/") and not target.exists():
        (folder / "sub").mkdir(exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"planted")
    entry = {"path": outside, "size": 7, "sha256": "0" * 64}
    if target.is_file():
        data = target.read_bytes()
        entry = {"path": outside, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    edit_manifest(folder, format=1, files=[entry])
    with pytest.raises(CheckpointInvalid, match="not a plain name inside the folder"):
        read_checkpoint(folder, verify_hashes=True)


def test_a_bogus_newest_checkpoint_listing_another_folders_files_is_quarantined(
    reference: Path, snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    layout = unfinished_copy(reference, tmp_path)
    bogus = shutil.copytree(layout.checkpoints_dir / NEWEST, layout.checkpoints_dir / "step-999999998")
    evil = tmp_path / "evil"  # outside the run; its hash is right, so only its name gives it away
    evil.write_bytes(b"planted")
    manifest = json.loads((bogus / "manifest.json").read_text(encoding="utf-8"))
    entry = {"path": "../../../evil", "size": 7, "xxh3_128_chunks": [xxhash.xxh3_128(b"planted").hexdigest()]}
    edit_manifest(bogus, step=999999998, files=[*manifest["files"], entry])
    log = resume(layout, snapshot, tmp_path, capsys)
    assert "start: resumed from checkpoint step 12 " in log
    reasons = {q.step: q.reason for q in list_quarantined(layout.quarantine_dir)}
    assert "not a plain name inside the folder" in reasons[999999998]
    assert sha256(layout.final_dir / "model.safetensors") == sha256(reference / "final" / "model.safetensors")


def test_a_symlinked_checkpoint_file_is_not_followed(
    reference: Path, snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    layout = unfinished_copy(reference, tmp_path)
    model = layout.checkpoints_dir / NEWEST / "model.safetensors"
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(model, elsewhere)  # the very same bytes: only the link is wrong
    model.unlink()
    model.symlink_to(elsewhere)
    log = resume(layout, snapshot, tmp_path, capsys)
    assert "start: resumed from checkpoint step 9 " in log
    reasons = {q.step: q.reason for q in list_quarantined(layout.quarantine_dir)}
    assert "model.safetensors: a symlink" in reasons[12]
    assert sha256(layout.final_dir / "model.safetensors") == sha256(reference / "final" / "model.safetensors")


@pytest.mark.parametrize(
    ("field", "value"),
    [("config_hash", "tampered"), ("step", 12), ("extra", {"torch_threads": 3}), ("extra", {"snapshot_sha256": "ab"})],
)
def test_one_tampered_manifest_field_quarantines_the_checkpoint_and_the_run_goes_on(
    reference: Path, snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object
):
    layout = unfinished_copy(reference, tmp_path)
    folder = layout.checkpoints_dir / NEWEST
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    if field == "config_hash":
        value = manifest["config_hash"][:-1] + ("0" if manifest["config_hash"][-1] != "0" else "1")
    if field == "step":  # the newest checkpoint's content renamed to be the previous one (and now the newest)
        shutil.rmtree(layout.checkpoints_dir / PREVIOUS)
        folder = folder.rename(layout.checkpoints_dir / PREVIOUS)
        value = 9
    if field == "extra":
        assert isinstance(value, dict)
        value = dict(manifest["extra"], **value)
    edit_manifest(folder, **{field: value})
    log = resume(layout, snapshot, tmp_path, capsys)
    resumed = 9 if field != "step" else 6
    assert f"start: resumed from checkpoint step {resumed} " in log
    reasons = [q.reason for q in list_quarantined(layout.quarantine_dir)]
    assert len(reasons) == 1 and "does not agree with its own" in reasons[0], reasons
    assert sha256(layout.final_dir / "model.safetensors") == sha256(reference / "final" / "model.safetensors")


def test_a_tampered_config_hash_in_the_final_model_redoes_it_from_the_checkpoints(
    reference: Path, snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    shutil.copytree(reference, tmp_path / "run", symlinks=True)
    layout = RunLayout(tmp_path / "run")
    manifest = json.loads((layout.final_dir / "manifest.json").read_text(encoding="utf-8"))
    edit_manifest(layout.final_dir, config_hash=manifest["config_hash"][:-1] + "x")
    log = resume(layout, snapshot, tmp_path, capsys)
    assert "final model quarantined to " in log and "start: resumed from checkpoint step 12 " in log
    reasons = [q.reason for q in list_quarantined(layout.quarantine_dir)]
    assert len(reasons) == 1 and "config_hash disagrees with the run's own checkpoints" in reasons[0]
    assert sha256(layout.final_dir / "model.safetensors") == sha256(reference / "final" / "model.safetensors")


def test_a_changed_config_still_stops_the_run_with_exit_65(
    reference: Path, snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """The run's own input changed (not a tampered checkpoint): exit 65 naming the fields, nothing quarantined."""
    layout = unfinished_copy(reference, tmp_path)
    config = write_config(tmp_path / "config.json", **(SETTINGS | {"learningRate": 1e-3}))
    assert train(layout.run_dir, snapshot, config) == ExitCode.INVALID_INPUT
    assert "(fields: learningRate 0.003 -> 0.001)" in capsys.readouterr().err
    assert list_quarantined(layout.quarantine_dir) == []


@pytest.mark.parametrize("problem", ["a file", "a symlinked checkpoints folder", "not writable"])
def test_run_dir_problems_exit_65_with_one_line_naming_the_path(
    snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], problem: str
):
    run_dir = tmp_path / "run"
    named = run_dir
    if problem == "a file":
        run_dir.write_text("not a folder", encoding="utf-8")
    elif problem == "a symlinked checkpoints folder":
        (tmp_path / "elsewhere").mkdir()
        run_dir.mkdir()
        (run_dir / "checkpoints").symlink_to(tmp_path / "elsewhere")
        named = run_dir / "checkpoints"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a mode-555 folder; this case runs as a normal user only")
        run_dir.mkdir(mode=0o555)
    termination = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(termination))
    config = write_config(tmp_path / "config.json", **SETTINGS)
    code = train(run_dir, snapshot, config)
    err = capsys.readouterr().err
    assert code == ExitCode.INVALID_INPUT, err[-2000:]
    assert "Traceback" not in err
    message = termination.read_text(encoding="utf-8")
    assert message.count("\n") == 1 and str(named) in message, message
    if problem == "not writable":
        assert f"not writable by UID {os.geteuid()} (GID {os.getegid()}); it is owned by UID" in message, message
    assert not (tmp_path / "elsewhere").exists() or not any((tmp_path / "elsewhere").iterdir())


def test_a_run_dir_another_uid_owns_is_refused_naming_the_path_and_the_uid(tmp_path: Path) -> None:
    """What a leg running as the image's UID meets on a root-made claim without fsGroup (issue 12). As root, the
    check runs in a child as UID/GID 65534 against a root-owned folder; otherwise, in this process against a
    folder of mode 555. Either way the one line names the folder, the UID that cannot write it and its owner."""
    if os.geteuid() != 0:
        run_dir = tmp_path / "run"
        run_dir.mkdir(mode=0o555)
        message = run_dir_problem(RunLayout(run_dir)) or ""
        uid, gid, owner = os.geteuid(), os.getegid(), f"UID {os.geteuid()}"
    else:
        if shutil.which("setpriv") is None:
            pytest.fail("as root this test drops to UID 65534 with setpriv (util-linux), which is missing")
        base = Path(tempfile.mkdtemp(dir="/tmp", prefix="relay-uid-"))  # a folder other UIDs can traverse
        try:
            base.chmod(0o755)
            run_dir = base / "run"
            run_dir.mkdir(mode=0o755)
            probe = "import sys; from pathlib import Path; from trainer.train import run_dir_problem; "
            probe += "from trainer.volume import RunLayout; print(run_dir_problem(RunLayout(Path(sys.argv[1]))))"
            drop = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
            child = subprocess.run(
                [*drop, sys.executable, "-c", probe, str(run_dir)],
                capture_output=True, text=True, timeout=60, cwd=base,
                env={**os.environ, "PYTHONPATH": str(Path(inspect.getfile(run_dir_problem)).parents[1])},
            )  # fmt: skip
            assert child.returncode == 0, child.stderr[-2000:]
            message = child.stdout.strip()
        finally:
            shutil.rmtree(base)
        uid, gid, owner = 65534, 65534, "UID 0 GID 0, mode 755"
    assert message.startswith(f"--run-dir {run_dir}: not writable by UID {uid} (GID {gid}); it is owned by "), message
    assert owner in message and "fsGroup" in message, message
