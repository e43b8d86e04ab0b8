"""A finished run's trainer output stays on the volume: a leg started with $RELAY_LEG (as a Kubernetes Job starts
it) tees its stdout and stderr to `runs/<ns>/<name>/legs/<n>.log`, and `relay logs RUN` prints it after the pod
is gone. The file is size-capped (rotated to `<n>.log.1`), and a symlink planted there (to another namespace's
file, say) is never written or read through."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.trainer.trainer_helpers import REPO, build_snapshot, make_rows, train_command, trainer_env, write_config
from trainer.leg_log import LegLog, tee_leg_log
from trainer.volume import LegRecord, RunLayout, write_leg_record


def relay(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "controller.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """A volume with one namespace's run `ml/bert` and another namespace's leg log beside it."""
    other = RunLayout.for_run(tmp_path, "other", "secret").leg_log_path(0)
    other.parent.mkdir(parents=True)
    other.write_text("another namespace's line\n", encoding="utf-8")
    return tmp_path


def test_a_kubernetes_leg_keeps_its_output_on_the_volume_and_relay_logs_prints_it(volume: Path) -> None:
    snapshot = build_snapshot(volume / "snapshot", {"train": make_rows(96, seed=1), "eval": make_rows(32, seed=2)})
    config = write_config(volume / "config.json", maxSteps=6, checkpointEverySteps=3, logEverySteps=1)
    layout = RunLayout.for_run(volume, "ml", "bert")
    command = train_command(layout.run_dir, snapshot, config)
    leg = subprocess.run(command, env=trainer_env(RELAY_LEG="0"), capture_output=True, text=True, timeout=180)
    assert leg.returncode == 0, leg.stderr[-3000:]
    kept = layout.leg_log_path(0).read_text(encoding="utf-8")
    assert "step 6/6" in kept and "checkpoint step-000000006 saved" in kept, kept
    assert sorted(kept.splitlines()) == sorted((leg.stdout + leg.stderr).splitlines()), "every line, nothing else"
    printed = relay("logs", "bert", "--namespace", "ml", "--volume", str(volume))
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == kept
    missing = relay("logs", "bert", "--namespace", "ml", "--volume", str(volume), "--leg", "3")
    assert missing.returncode == 1 and "no log of leg 3 of ml/bert" in missing.stderr and "[0]" in missing.stderr


def test_without_relay_leg_nothing_is_teed(tmp_path: Path) -> None:
    assert tee_leg_log(tmp_path / "run", leg="") is None
    assert not (tmp_path / "run").exists()


def test_a_symlink_at_the_leg_log_is_neither_written_nor_read_through(
    volume: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = RunLayout.for_run(volume, "ml", "bert")
    target = RunLayout.for_run(volume, "other", "secret").leg_log_path(0)
    layout.legs_dir.mkdir(parents=True)
    layout.leg_log_path(0).symlink_to(target)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test, whatever tee_leg_log did
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    assert tee_leg_log(layout.run_dir, leg="0") is None
    assert f"leg log {layout.leg_log_path(0)} not kept" in capsys.readouterr().err
    assert target.read_text(encoding="utf-8") == "another namespace's line\n"
    printed = relay("logs", "bert", "--namespace", "ml", "--volume", str(volume), "--leg", "0")
    assert printed.returncode == 2 and printed.stdout == ""
    assert f"relay: {layout.leg_log_path(0)}: the file is a symlink" in printed.stderr, printed.stderr
    traversal = relay("logs", "..", "--namespace", "other", "--volume", str(volume))
    assert traversal.returncode == 2 and "NAME '..': must be one name" in traversal.stderr


def test_the_leg_log_rotates_at_its_cap_and_relay_logs_prints_both_parts_in_order(volume: Path) -> None:
    layout = RunLayout.for_run(volume, "ml", "bert")
    leg_log = LegLog(layout.leg_log_path(2), layout.leg_log_rotated_path(2), max_bytes=100)
    lines = [f"line {i:03d} " + "x" * 30 + "\n" for i in range(10)]  # 40 bytes each
    for line in lines:
        leg_log.write(line)
    leg_log.close()
    assert layout.leg_log_path(2).stat().st_size <= 100 and layout.leg_log_rotated_path(2).stat().st_size <= 100
    printed = relay("logs", "bert", "--namespace", "ml", "--volume", str(volume))  # leg 2: the newest
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == "".join(lines[-4:]), "the newest lines, the older part first"


FULL_VOLUME = """
import resource, signal, sys
from pathlib import Path
from trainer.leg_log import LegLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full volume
resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
leg_log = LegLog(Path(sys.argv[1]), Path(sys.argv[1] + ".1"))
for i in range(5):
    leg_log.write(f"line {i} " + "y" * 20 + "\\n")
print("training went on")
"""


def test_a_leg_log_that_cannot_be_written_is_turned_off_and_the_leg_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "legs" / "0.log"
    env = trainer_env(PYTHONPATH=str(REPO / "trainer_image"))
    child = subprocess.run([sys.executable, "-c", FULL_VOLUME, str(path)], capture_output=True, text=True, env=env)
    assert child.returncode == 0, child.stderr
    assert child.stdout == "training went on\n"
    assert f"relay trainer: leg log {path} no longer written: [Errno 27] File too large" in child.stderr
    assert child.stderr.count("no longer written") == 1, "said once, then the tee stays off"
    assert path.read_text(encoding="utf-8").startswith("line 0 ")


def test_relay_logs_follow_prints_appended_lines_until_the_leg_ends(volume: Path) -> None:
    layout = RunLayout.for_run(volume, "ml", "bert")
    leg_log = LegLog(layout.leg_log_path(0), layout.leg_log_rotated_path(0))
    leg_log.write("first line\n")

    def leg() -> None:
        time.sleep(1.5)
        leg_log.write("second line\n")
        write_leg_record(layout, LegRecord(leg=0, outcome="completed", end_step=6))
        leg_log.close()

    writer = threading.Thread(target=leg)
    writer.start()
    started = time.monotonic()
    printed = relay("logs", "bert", "--namespace", "ml", "--volume", str(volume), "-f", timeout=30)
    writer.join()
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == "first line\nsecond line\n"
    assert time.monotonic() - started >= 1.5, "it waited for the leg"
