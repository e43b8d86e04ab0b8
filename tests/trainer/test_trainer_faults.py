"""The test-only fault hooks: parsed once from RELAY_TEST_* variables, no-ops without them, and read nowhere
else in the shipped trainer."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from trainer_helpers import REPO, write_config

from trainer import faults as faults_mod
from trainer.faults import NO_FAULTS, Faults, FaultSettingInvalid
from trainer.train import run_leg
from trainer.volume import ExitCode, RunLayout, read_checkpoint


def test_no_variables_no_faults() -> None:
    assert Faults.from_env({}) == NO_FAULTS == Faults()
    assert Faults.from_env({"RELAY_TEST_KILL_AFTER_STEP": "", "PATH": "/bin"}) == NO_FAULTS
    assert NO_FAULTS.describe() == "none"


def test_every_variable_is_parsed_into_its_field() -> None:
    faults = Faults.from_env(
        {
            "RELAY_TEST_KILL_AFTER_STEP": "3",
            "RELAY_TEST_SIGTERM_DURING_STEP": "4",
            "RELAY_TEST_SIGTERM_DURING_EVAL": "1",
            "RELAY_TEST_STEP_SLEEP_S": "0.03",
            "RELAY_TEST_KILL_IN_CHECKPOINT_WRITE": "8",
            "RELAY_TEST_CHECKPOINT_COPY_DELAY_S": "0.05",
            "RELAY_TEST_CHECKPOINT_WRITE_DELAY_S": "0.25",
        }
    )
    assert faults == Faults(
        kill_after_step=3,
        sigterm_during_step=4,
        sigterm_during_eval=True,
        step_sleep_s=0.03,
        kill_in_checkpoint_write=8,
        checkpoint_copy_delay_s=0.05,
        checkpoint_write_delay_s=0.25,
    )
    assert "kill_after_step=3" in faults.describe()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("RELAY_TEST_KILL_AFTER_STEP", "three", "RELAY_TEST_KILL_AFTER_STEP: 'three' is not a step number"),
        ("RELAY_TEST_STEP_SLEEP_S", "1s", "RELAY_TEST_STEP_SLEEP_S: '1s' is not a number of seconds"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(FaultSettingInvalid) as caught:
        Faults.from_env({name: value})
    assert str(caught.value) == expected


def test_hooks_without_faults_do_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise AssertionError("a hook acted without a fault set")

    monkeypatch.setattr(faults_mod.os, "kill", refuse)
    monkeypatch.setattr(faults_mod.time, "sleep", refuse)
    for step in range(3):
        NO_FAULTS.during_step(step, 0)
        NO_FAULTS.slow_step()
        NO_FAULTS.after_step(step)
        NO_FAULTS.in_checkpoint_write(step)
    NO_FAULTS.during_eval()
    NO_FAULTS.before_checkpoint_copy()


def test_hooks_fire_at_their_step_only(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, object]] = []
    monkeypatch.setattr(faults_mod.os, "kill", lambda _pid, signum: sent.append(("kill", signal.Signals(signum).name)))
    monkeypatch.setattr(faults_mod.time, "sleep", lambda seconds: sent.append(("sleep", seconds)))
    faults = Faults(sigterm_during_step=2, kill_after_step=5, kill_in_checkpoint_write=4, checkpoint_write_delay_s=0.1)
    faults.during_step(2, 1)  # not the first micro-batch
    faults.during_step(1, 0)
    assert sent == []
    faults.during_step(2, 0)
    faults.after_step(4)
    faults.after_step(5)
    faults.in_checkpoint_write(2)
    faults.in_checkpoint_write(4)
    assert sent == [
        ("kill", "SIGTERM"),
        ("kill", "SIGKILL"),
        ("sleep", 0.1),
        ("sleep", 0.1),
        ("kill", "SIGKILL"),
    ]


def test_injected_sets_the_active_faults_for_the_block_only() -> None:
    assert faults_mod.active() is NO_FAULTS
    chosen = Faults(checkpoint_copy_delay_s=0.01)
    with faults_mod.injected(chosen):
        assert faults_mod.active() is chosen
    assert faults_mod.active() is NO_FAULTS


def test_run_leg_injects_faults_handed_in_without_the_environment(
    snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_TEST_KILL_AFTER_STEP", "1")  # ignored: the faults handed in win
    config = write_config(tmp_path / "config.json", maxSteps=6, checkpointEverySteps=4)
    run_dir = tmp_path / "run"
    result = run_leg(run_dir, snapshot, config, faults=Faults(sigterm_during_step=3))
    assert result.exit_code == ExitCode.PREEMPTED, result.message
    assert "finished step 3 and saved checkpoint step 3" in result.message
    saved = read_checkpoint(RunLayout(run_dir).checkpoints_dir / "step-000000003", verify_hashes=True)
    assert saved.extra["emergency"] is True
    assert faults_mod.active() is NO_FAULTS, "the leg's faults end with the leg"


def test_no_other_trainer_module_reads_a_test_variable() -> None:
    package = REPO / "trainer_image" / "trainer"
    readers = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(r"RELAY_TEST_[A-Z]", path.read_text(encoding="utf-8"))
    )
    assert readers == ["faults.py"], "fault injection goes through trainer/faults.py only"


def test_the_readme_documents_every_variable() -> None:
    readme = (REPO / "trainer_image" / "README.md").read_text(encoding="utf-8")
    names = [value for key, value in vars(faults_mod).items() if key.endswith("_ENV")]
    assert len(names) == 8
    missing = [name for name in names if f"`{name}=" not in readme]
    assert not missing, f"trainer_image/README.md lacks {missing}"
