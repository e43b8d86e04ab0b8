"""`relay plot` draws a real run's folder into a PNG of the documented size, and names a missing run in one line.

The run folder is the one the short drill of tests/drill leaves (a real local run with preemptions, a
failed leg and a quarantined checkpoint); the drill runs once per session whichever test asks first.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controller.plot import DPI, HEIGHT_PX, WIDTH_PX, PlotError, plot_run, read_run


@pytest.fixture(scope="session")
def drilled_run_dir(short_drill: Any) -> Path:
    """The run folder of the session's short drill (tests/conftest.py)."""
    assert (short_drill.run_dir / "final/metrics.json").is_file(), short_drill.output[-3000:]
    return short_drill.run_dir


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.slow
def test_the_cli_draws_a_real_run(drilled_run_dir: Path, tmp_path: Path) -> None:
    volume = drilled_run_dir.parents[2]
    output = tmp_path / "pictures/run.png"
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", "plot", "drill", "--volume", str(volume), "-o", str(output)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _png_size(output) == (WIDTH_PX, HEIGHT_PX) == (12 * DPI, 7 * DPI)
    assert output.stat().st_size > 20_000  # lines, bars and text, not an empty canvas


@pytest.mark.slow
def test_the_story_read_from_the_folder(drilled_run_dir: Path) -> None:
    run = read_run(drilled_run_dir)
    assert run.steps[0] == 1 and run.steps[-1] == run.final_metrics["steps"]  # every step logged, one loss per step
    assert run.steps == sorted(set(run.steps))
    assert run.evals and run.evals[-1]["accuracy"] == pytest.approx(run.final_metrics["accuracy"])
    assert len(run.legs) >= 4 and run.legs[-1]["outcome"] == "completed"
    assert run.quarantined and all(step % 10 == 0 for step in run.quarantined)
    stopped = [leg for leg in run.legs if leg["outcome"] != "completed"]
    for leg, following in zip(run.legs, run.legs[1:], strict=False):
        assert following["ranFrom"] <= leg["ranTo"]  # every leg resumed at or before where the last one stopped
    assert any(leg["ranTo"] > leg["endStep"] for leg in stopped)  # a SIGKILL lost steps after a checkpoint


def test_a_missing_run_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PlotError, match="no such run folder"):
        plot_run(tmp_path / "runs/default/nope", tmp_path / "x.png")
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", "plot", "nope", "--volume", str(tmp_path), "-o",
         str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "runs/default/nope" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_an_empty_run_folder_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(PlotError, match=r"history\.jsonl"):
        read_run(tmp_path / "run")
