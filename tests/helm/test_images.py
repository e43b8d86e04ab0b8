"""What the images promise, checked without a Docker engine: the wheel ships every controller module, the
controller runs without torch, and the Dockerfiles are multi-stage, pinned, offline-installed and non-root
with the UID the chart and the trainer Jobs use."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def stages(dockerfile: Path) -> list[list[str]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    result: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


def test_the_wheel_ships_every_package_of_the_controller_and_trainer() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "controller").rglob("__init__.py")} | {
        "trainer"
    }
    assert on_disk <= listed, f"missing from [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_the_controller_imports_without_torch() -> None:
    """The controller image has no torch: its entry points must not pull it in."""
    modules = ["controller.cli", "controller.worker", "controller.activities", "controller.observability"]
    modules += [m for m in ("controller.kubernetes.main",) if (REPO / (m.replace(".", "/") + ".py")).exists()]
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'torch' or name.startswith('torch.') or name == 'transformers':\n"
        "        raise ImportError(f'{name} imported by the controller')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_the_controller_dockerfile_is_multi_stage_pinned_offline_and_non_root() -> None:
    from controller.kubernetes.jobs import NON_ROOT_UID

    build, final = stages(REPO / "controller" / "Dockerfile")
    text = (REPO / "controller" / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base.group(1))
    assert build[0].startswith("FROM ${PYTHON_IMAGE} AS ") and final[0] == "FROM ${PYTHON_IMAGE}"
    final_text = "\n".join(final)
    assert "--no-index" in final_text, "the final stage installs only the wheels built in stage 1"
    assert not re.search(r"apt-get install|build-essential|gcc|python -m build", final_text)
    assert f"USER {NON_ROOT_UID}:{NON_ROOT_UID}" in final
    assert 'ENTRYPOINT ["relay"]' in final
    assert "relay[kubernetes]" in final_text and "[trainer" not in final_text


def test_the_chart_runs_the_controller_as_the_image_user() -> None:
    from controller.kubernetes.jobs import NON_ROOT_UID

    values = yaml.safe_load((REPO / "helm" / "relay" / "values.yaml").read_text(encoding="utf-8"))
    context = values["controller"]["podSecurityContext"]
    assert context["runAsUser"] == context["runAsGroup"] == context["fsGroup"] == NON_ROOT_UID


def test_the_trainer_dockerfile_runs_as_the_job_user() -> None:
    dockerfile = REPO / "trainer_image" / "Dockerfile"
    if not dockerfile.exists():
        pytest.fail("trainer_image/Dockerfile (area 1) is missing: `make image-trainer` cannot build")
    from controller.kubernetes.jobs import NON_ROOT_UID

    final = stages(dockerfile)[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the trainer image sets no USER"
    assert users[-1] == f"{NON_ROOT_UID}:{NON_ROOT_UID}", "the Job's runAsUser/fsGroup and the image must agree"


def test_versions_agree_across_package_chart_images_and_examples() -> None:
    """`make image-*` tags with the chart's appVersion; the chart and the TrainingRun default must name those tags."""
    from controller.spec import TrainingRunSpec

    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    chart = yaml.safe_load((REPO / "helm" / "relay" / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["appVersion"] == version
    assert TrainingRunSpec.model_fields["image"].default == f"ghcr.io/relay-ml/relay-trainer:{version}"
    values = yaml.safe_load((REPO / "helm" / "relay" / "values.yaml").read_text(encoding="utf-8"))
    assert values["image"]["repository"] == "ghcr.io/relay-ml/relay-controller" and values["image"]["tag"] == ""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "-t $(IMAGE_REGISTRY)/relay-trainer:$(IMAGE_TAG)" in makefile
    assert "-t $(IMAGE_REGISTRY)/relay-controller:$(IMAGE_TAG)" in makefile
    for example in sorted((REPO / "manifests" / "examples").glob("*.yaml")):
        image = yaml.safe_load(example.read_text(encoding="utf-8"))["spec"].get("image")
        assert image in (None, f"ghcr.io/relay-ml/relay-trainer:{version}"), f"{example.name}: image {image}"


def test_both_dockerfiles_build_with_the_legacy_builder_too() -> None:
    """No BuildKit-only instruction (`RUN --mount`, heredocs): machines without buildx build with the legacy one."""
    for dockerfile in (REPO / "controller" / "Dockerfile", REPO / "trainer_image" / "Dockerfile"):
        for line in (part for stage in stages(dockerfile) for part in stage):
            assert "--mount=" not in line and "<<" not in line, f"{dockerfile.relative_to(REPO)}: {line[:80]}"


def test_make_images_tags_what_the_chart_and_a_training_run_use_with_the_tests_torch() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    script = (REPO / "hack" / "build-images.sh").read_text(encoding="utf-8")
    target = re.search(r"^images:\n\t(.+)$", makefile, re.MULTILINE)
    assert target is not None and "hack/build-images.sh" in target.group(1)
    assert 'TORCH_SPEC="$(TORCH_SPEC)"' in target.group(1), "the CPU trainer's torch must be the tests' pin"
    pin = re.search(r"^TORCH_SPEC \?= (torch==\S+)$", makefile, re.MULTILINE)
    assert pin is not None and f"TORCH_SPEC=${{TORCH_SPEC:-{pin.group(1)}}}" in script
    assert "REGISTRY=${IMAGE_REGISTRY:-ghcr.io/relay-ml}" in script
    assert "helm/relay/Chart.yaml" in script, "the tag is the chart's appVersion, as the chart's default"
    assert "CONTROLLER=${CONTROLLER_IMAGE:-$REGISTRY/relay-controller:$TAG}" in script
    assert "TRAINER=${TRAINER_IMAGE:-$REGISTRY/relay-trainer:$TAG}" in script
    assert '--build-arg "TORCH_WHEEL=$WHEEL"' in script and '"torch==${TORCH_VERSION}+cpu"' in script


def test_the_build_context_lets_in_what_the_dockerfiles_copy_and_nothing_heavy() -> None:
    rules = [line for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines() if line.strip()]
    rules = [line for line in rules if not line.startswith("#")]
    assert rules[0] == "*", "an allow list: the checkout holds .venv, .envtest and volumes of several GB"
    allowed = [line[1:] for line in rules if line.startswith("!")]
    for dockerfile in (REPO / "controller" / "Dockerfile", REPO / "trainer_image" / "Dockerfile"):
        for line in (part for stage in stages(dockerfile) for part in stage):
            if not line.upper().startswith("COPY ") or "--from=" in line:
                continue
            for source in line.split()[1:-1]:
                source = source.replace("[s]", "s").rstrip("/")
                assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"
