"""hack/envtest.sh (what `make envtest` runs): where the control-plane binaries come from, and what it says.

Run for real in a scratch checkout, with a stand-in `curl` on PATH (no network here): it serves files from a
folder, or fails as curl does without a network. The order is KUBEBUILDER_ASSETS, ../shared/envtest (sha256
checked), the pinned official release (sha512 checked); without any, exit 0 and a line saying the tier skips.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "envtest.sh"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")

CURL = """#!/bin/sh
# curl -fsSL --connect-timeout N --max-time N -o OUT URL
while [ $# -gt 1 ]; do [ "$1" = -o ] && out=$2; shift; done
echo "curl $1" >> "$FAKE_CURL_LOG"
served="$FAKE_CURL_DIR/$(basename "$1")"
[ -n "$FAKE_CURL_DIR" ] && [ -f "$served" ] || { echo "curl: (6) Could not resolve host" >&2; exit 6; }
cp "$served" "$out"
"""


def _fake_binary(version: str) -> bytes:
    return f"#!/bin/sh\necho 'Kubernetes {version}'\n".encode()


def _run(tmp_path: Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the script from <tmp>/main (so ../shared is <tmp>/shared) with the stand-in curl first on PATH."""
    checkout = tmp_path / "main"
    (checkout / "hack").mkdir(parents=True, exist_ok=True)
    shutil.copy(SCRIPT, checkout / "hack" / "envtest.sh")
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    (tools / "curl").write_text(CURL, encoding="utf-8")
    (tools / "curl").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("KUBEBUILDER_ASSETS", "ENVTEST_K8S_VERSION")}
    full = {**base, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "FAKE_CURL_LOG": str(tmp_path / "curl.log"),
            "FAKE_CURL_DIR": "", "VENV_BIN": str(tmp_path / "no-venv"), **(env or {})}  # fmt: skip
    result = subprocess.run(["bash", "hack/envtest.sh", ".envtest"], cwd=checkout, env=full, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    return result, checkout / ".envtest"


def test_without_any_source_it_says_so_and_exits_0(tmp_path: Path) -> None:
    result, dest = _run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "could not be downloaded (no network?); the cluster tier will be SKIPPED" in result.stdout
    assert "envtest-v1.34.1/envtest-v1.34.1-linux-" in (tmp_path / "curl.log").read_text()
    assert not (dest / "kube-apiserver").exists()


def test_kubebuilder_assets_comes_first_and_is_named(tmp_path: Path) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "kube-apiserver").write_bytes(_fake_binary("v1.31.0"))
    (assets / "kube-apiserver").chmod(0o755)
    result, dest = _run(tmp_path, {"KUBEBUILDER_ASSETS": str(assets)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"envtest: using KUBEBUILDER_ASSETS={assets} (Kubernetes v1.31.0)"
    assert not dest.exists() and not (tmp_path / "curl.log").exists()


def test_the_offline_build_beside_the_checkout_is_unpacked_and_checked(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "envtest"
    (shared / "bin").mkdir(parents=True)
    sums = []
    for name in BINARIES:
        data = _fake_binary("v1.20.2")
        (shared / "bin" / f"{name}.xz").write_bytes(lzma.compress(data))
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    (shared / "SHA256SUMS").write_text("".join(sums), encoding="utf-8")
    result, dest = _run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "using ../shared/envtest (Kubernetes v1.20.2, offline build, sha256 checked)" in result.stdout
    assert all(os.access(dest / name, os.X_OK) for name in BINARIES)

    (dest / "kube-apiserver").unlink()  # a tampered build is refused and nothing of it is left
    (shared / "SHA256SUMS").write_text("".join(sums).replace(sums[0][:64], "0" * 64), encoding="utf-8")
    result, dest = _run(tmp_path)
    assert result.returncode == 1 and "sha256 mismatch in ../shared/envtest" in result.stdout
    assert not any((dest / name).exists() for name in BINARIES)


def test_a_download_whose_sha512_differs_from_the_pinned_one_is_refused(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    for arch in ("amd64", "arm64"):
        (served / f"envtest-v1.28.3-linux-{arch}.tar.gz").write_bytes(b"not the release")
    result, dest = _run(tmp_path, {"FAKE_CURL_DIR": str(served), "ENVTEST_K8S_VERSION": "1.28.3"})
    assert result.returncode == 1 and "sha512 mismatch for envtest-v1.28.3-linux-" in result.stdout
    assert not (dest / "kube-apiserver").exists()


def test_an_unpinned_version_is_named_and_skipped(tmp_path: Path) -> None:
    result, _ = _run(tmp_path, {"ENVTEST_K8S_VERSION": "1.99.0"})
    assert result.returncode == 0 and "no pinned release for v1.99.0" in result.stdout


def test_every_version_the_ci_matrix_downloads_has_a_pinned_sha512() -> None:
    """The cluster-tier job's versions are the oldest and newest supported; each needs its sum in the script."""
    script = SCRIPT.read_text(encoding="utf-8")
    pinned = set(re.findall(r"^  \[(\d+\.\d+\.\d+)-amd64\]=[0-9a-f]{128}$", script, re.MULTILINE))
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "ci.yml").read_text(encoding="utf-8"))
    versions = workflow["jobs"]["cluster-tier"]["strategy"]["matrix"]["kubernetes"]
    assert len(versions) == 2 and set(map(str, versions)) <= pinned, (versions, pinned)
    default = re.search(r"^VERSION=\$\{ENVTEST_K8S_VERSION:-([\d.]+)\}$", script, re.MULTILINE)
    assert default is not None and default.group(1) in pinned
    steps = "\n".join(step.get("run", "") for step in workflow["jobs"]["cluster-tier"]["steps"])
    assert "make envtest ENVTEST_K8S_VERSION=${{ matrix.kubernetes }}" in steps
    assert '! grep -F "KUBERNETES CLUSTER TIER SKIPPED"' in steps and "set -o pipefail" in steps  # a skip fails
