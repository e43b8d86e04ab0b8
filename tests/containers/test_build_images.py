"""hack/build-images.sh's choice of Docker client for BuildKit, against stand-in clients (no engine needed).

A Docker CLI of 23 or later builds with BuildKit only through the buildx plugin; asked for BuildKit without it,
the script stops before building anything and says what to do, instead of a bare error from the client.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "build-images.sh"


def stand_in_client(folder: Path, name: str, version: str, buildx: bool) -> Path:
    """A docker client that logs its calls, answers `info` and `version`, and has buildx or not."""
    client = folder / name
    buildx_answer = "exit 0" if buildx else "echo 'unknown command: docker buildx' >&2; exit 1"
    lines = [
        "#!/bin/sh",
        f'printf "%s\\n" "$*" >> "{folder}/calls"',
        'case "$1" in',
        f"  buildx) {buildx_answer} ;;",
        f"  version) echo {version} ;;",
        "esac",
    ]
    client.write_text("\n".join(lines) + "\n", encoding="utf-8")
    client.chmod(0o755)
    return client


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT)], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=30
    )


def test_buildkit_with_a_new_client_without_buildx_stops_before_building_and_says_what_to_do(tmp_path: Path) -> None:
    client = stand_in_client(tmp_path, "docker", "28.2.2", buildx=False)
    result = run({"DOCKER_BUILDKIT": "1", "DOCKER": str(client)})
    assert result.returncode == 1
    assert "docker client 28.2.2 builds with BuildKit only through the buildx plugin" in result.stderr
    assert "set DOCKER to a client with BuildKit built in" in result.stderr
    calls = (tmp_path / "calls").read_text(encoding="utf-8").splitlines()
    assert [call.split()[0] for call in calls] == ["info", "buildx", "version"], "nothing built or inspected"


def test_a_missing_client_named_in_docker_is_reported_by_name(tmp_path: Path) -> None:
    result = run({"DOCKER": str(tmp_path / "no-such-docker")})
    assert result.returncode == 1
    assert f"no docker client: '{tmp_path / 'no-such-docker'}' is not installed" in result.stderr
