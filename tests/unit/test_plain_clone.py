"""A plain clone works: the test suite of a clone with no ../shared beside it and no envtest binaries collects
with exit 0, and the cluster tier skips loudly (each skip's reason and a red summary section), not as a warning
that warnings-as-errors turns into INTERNALERROR (exit 3).

The clone is of this checkout's HEAD (what a user cloning the repository gets; uncommitted changes are not in it),
made under the temporary folder, so nothing may depend on where the checkout lives. It runs with this venv's
Python, the clone's own code first on the path, and KUBEBUILDER_ASSETS unset.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOUD = "KUBERNETES CLUSTER TIER SKIPPED"


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.fail("the plain-clone test needs git and a git checkout to clone", pytrace=False)
    target = tmp_path_factory.mktemp("plain-clone") / "relay"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(target)], check=True, timeout=120)
    assert not (target.parent / "shared").exists() and not (target / ".envtest").exists()
    return target


def _pytest(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBEBUILDER_ASSETS", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(clone), str(clone / "trainer_image")])  # the clone's code, not ours
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=clone, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_plain_clone_collects_the_whole_suite_and_says_the_cluster_tier_is_skipped(clone: Path) -> None:
    result = _pytest(clone, "--collect-only", "-q")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "INTERNALERROR" not in output
    assert LOUD in output
    assert f"{clone}" in output.split(LOUD, 1)[1]  # the clone's own code was collected: its .envtest is named
    assert "tests/kubernetes/test_k8s_operator.py" in output and "tests/unit/test_plain_clone.py" in output


def test_a_plain_clone_skips_every_cluster_test_loudly_and_exits_0(clone: Path) -> None:
    result = _pytest(clone, "tests/kubernetes", "-m", "cluster", "-q", "-rs")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    summary = output.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "failed" not in summary, summary
    assert LOUD in output
    assert "cluster tests skipped: envtest binaries missing" in output
    assert "SKIPPED [" in output and "run `make envtest` or set KUBEBUILDER_ASSETS" in output
