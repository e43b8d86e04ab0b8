"""hack/e2e-kind.sh's logic, run for real against stand-ins for docker, kind, helm and kubectl.

No Docker engine here, so the script cannot reach a cluster. Its own decisions can still be tested: which
images it builds and loads (taken from the rendered chart), how it installs, when it deletes the trainer
pod (only while it runs, after a verified checkpoint), and what it calls success or failure. The stand-ins
log every call; `helm template` renders the chart with the Helm library; `kubectl` plays a TrainingRun
whose status advances with each poll, in the scenario the test picks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "e2e-kind.sh"

LOGGING_TOOL = """#!/bin/sh
printf '%s\\n' "$(basename "$0") $*" >> "$E2E_FAKE_LOG"
"""

HELM = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["E2E_FAKE_LOG"], "a") as log:
    log.write("helm " + " ".join(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[0] == "template":
    import helm_python, yaml
    release, chart = args[1], args[2]
    values = yaml.safe_load(open(args[args.index("-f") + 1]))
    with helm_python.Chart.load(chart) as loaded:
        rendered = loaded.render(values, name=release, namespace=args[args.index("--namespace") + 1])
    print("\\n---\\n".join(t for name, t in sorted(rendered.items()) if not name.endswith("NOTES.txt")))
"""

# The TrainingRun as the cluster would show it: each status poll advances the scenario by one step.
KUBECTL = f"""#!{sys.executable}
import json, os, sys
state_path = os.environ["E2E_FAKE_STATE"]
state = json.load(open(state_path))
args = sys.argv[1:]
with open(os.environ["E2E_FAKE_LOG"], "a") as log:
    log.write("kubectl " + " ".join(args) + "\\n")
def save():
    json.dump(state, open(state_path, "w"))
if "apply" in args:
    state["applied"] = True
elif "delete" in args and any(a.startswith("pod/") for a in args):
    state["deleted_while"] = dict(phase=state["phase"], checkpoint=state["checkpoint"])
    state["preempted"] = True
elif "trainingrun" in args and any(a.startswith("jsonpath=") for a in args) and state["applied"]:
    path = next(a for a in args if a.startswith("jsonpath=")).removeprefix("jsonpath={{").removesuffix("}}")
    if path == ".status.phase":
        state["polls"] += 1
        scenario = state["scenario"]
        if scenario == "fails":
            state["phase"] = "Failed"
        elif state["preempted"]:
            state["legs"], state["preemptions"] = 2, 1
            state["phase"] = "Succeeded" if state["polls"] > state["preempted_at"] + 2 else "Running"
        elif scenario == "too-fast" and state["polls"] > 2:
            state["phase"] = "Succeeded"
        else:
            state["phase"] = "Running" if state["polls"] > 1 else "Pending"
            state["checkpoint"] = 5 if state["polls"] > 3 else None
            state["preempted_at"] = state["polls"]
        save()
    value = dict(
        phase=state["phase"], step=12, legCount=state["legs"], preemptions=state["preemptions"],
        message="trainer exited 1: boom",
    ).get(path.split(".")[-1]) if path != ".status.latestCheckpoint.step" else state["checkpoint"]
    print("" if value is None else value, end="")
elif "pods" in args and "-o" in args and "name" in args:
    if state["phase"] == "Running" and not state["preempted"]:
        print("pod/tiny-cpu-leg-0-abcde")
save()
"""


def run_script(
    tmp_path: Path, scenario: str, tools: tuple[str, ...] = ("docker", "kind", "helm", "kubectl")
) -> tuple[subprocess.CompletedProcess[str], list[str], dict[str, object]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sources = {"docker": LOGGING_TOOL, "kind": LOGGING_TOOL, "helm": HELM, "kubectl": KUBECTL}
    for tool in tools:
        (bin_dir / tool).write_text(sources[tool], encoding="utf-8")
        (bin_dir / tool).chmod(0o755)
    log, state = tmp_path / "calls.log", tmp_path / "state.json"
    log.write_text("", encoding="utf-8")
    state.write_text(
        json.dumps(
            dict(
                scenario=scenario,
                applied=False,
                phase="",
                checkpoint=None,
                polls=0,
                preempted=False,
                preempted_at=0,
                legs=1,
                preemptions=0,
                deleted_while=None,
            )
        ),
        encoding="utf-8",
    )
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "E2E_FAKE_LOG": str(log),
        "E2E_FAKE_STATE": str(state),
        "E2E_POLL_S": "0.01",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    return result, log.read_text(encoding="utf-8").splitlines(), json.loads(state.read_text(encoding="utf-8"))


def test_installs_preempts_mid_run_and_waits_for_succeeded(tmp_path: Path) -> None:
    result, calls, state = run_script(tmp_path, "normal")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "E2E PASSED: tiny-cpu Succeeded after 1 preemption(s) in 2 legs" in result.stdout

    def index(prefix: str) -> int:
        return next(i for i, call in enumerate(calls) if call.startswith(prefix))

    controller, trainer = "ghcr.io/relay-ml/relay-controller:0.1.0", "ghcr.io/relay-ml/relay-trainer:0.1.0"
    assert index("kind create cluster --name relay-e2e") < index(
        f"docker build -f controller/Dockerfile -t {controller} ."
    )
    assert index(f"docker build -f trainer_image/Dockerfile -t {trainer} .") < index("kind load docker-image")
    load = calls[index("kind load docker-image")]
    assert load.split()[-3:] == [controller, trainer, "temporalio/temporal:1.9.1"]
    install = calls[index("helm --kube-context kind-relay-e2e upgrade --install relay helm/relay")]
    assert "--namespace relay-e2e --create-namespace -f hack/e2e-kind-values.yaml --wait" in install
    assert index("helm --kube-context") < index(
        "kubectl --context kind-relay-e2e -n relay-e2e apply -f manifests/examples/tiny-cpu.yaml"
    )
    assert calls[index("kubectl --context kind-relay-e2e -n relay-e2e delete pod/")].endswith(
        "delete pod/tiny-cpu-leg-0-abcde --wait=false"
    )
    assert state["deleted_while"] == {"phase": "Running", "checkpoint": 5}
    assert calls[-1] == "kind delete cluster --name relay-e2e"


def test_a_run_that_ends_before_the_preemption_fails_the_test(tmp_path: Path) -> None:
    result, calls, state = run_script(tmp_path, "too-fast")
    assert result.returncode == 1
    assert "E2E FAILED: the run finished before its pod could be deleted" in result.stderr
    assert state["deleted_while"] is None
    assert "==> diagnostics (exit 1)" in result.stdout
    assert calls[-1] == "kind delete cluster --name relay-e2e"


def test_a_failed_run_fails_with_its_message_and_diagnostics(tmp_path: Path) -> None:
    result, calls, _ = run_script(tmp_path, "fails")
    assert result.returncode == 1
    assert "E2E FAILED: the run failed before the preemption: trainer exited 1: boom" in result.stderr
    assert any(" logs deployment/relay --tail=200" in call for call in calls)


def test_a_missing_tool_is_named(tmp_path: Path) -> None:
    result, calls, _ = run_script(tmp_path, "normal", tools=("docker", "helm", "kubectl"))
    assert result.returncode == 1
    assert "E2E FAILED: kind is not installed" in result.stderr
    assert calls == []


@pytest.mark.parametrize("values_file", ["hack/e2e-kind-values.yaml"])
def test_the_kind_values_use_loaded_images_and_single_node_storage(values_file: str) -> None:
    import helm_python
    import yaml

    values = yaml.safe_load((REPO / values_file).read_text(encoding="utf-8"))
    with helm_python.Chart.load(REPO / "helm" / "relay") as chart:
        rendered = chart.render(values, name="relay", namespace="relay-e2e")
    objects = [d for name, t in rendered.items() if not name.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    controller = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "relay")
    assert controller["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "Never"
    claim = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["storageClassName"] == "standard"
    assert any(o["kind"] == "Deployment" and o["metadata"]["name"] == "relay-temporal" for o in objects)
