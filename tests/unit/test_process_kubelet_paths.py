"""The process kubelet maps a pod's mount paths, and nothing else, into the pod's folder.

A clone under /tmp once failed `test_helm_install`: the chart mounts an emptyDir at /tmp, and the kubelet rewrote
the controller's own `/tmp/<clone>/.venv/bin/relay` into `volumes/tmp/...` ("not found"). Checked here without a
cluster: the path function itself, and a pod whose command lives under a mount path really starting.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import kubernetes

from relay_testing.control_plane import REPO_ROOT
from relay_testing.process_kubelet import LocalPod, ProcessKubelet, rewrite_path

MAPPING = [("/relay-volume/runs/ml/bert", "/v/runs/ml/bert"), ("/relay-volume", "/v"), ("/tmp", "/pod/volumes/tmp")]


def test_mount_paths_are_rewritten_at_whole_components_only() -> None:
    assert rewrite_path("/tmp", MAPPING, []) == "/pod/volumes/tmp"
    assert rewrite_path("/tmp/x.json", MAPPING, []) == "/pod/volumes/tmp/x.json"
    assert rewrite_path("/relay-volume/runs/ml/bert/legs", MAPPING, []) == "/v/runs/ml/bert/legs"
    assert rewrite_path("/relay-volume/snapshots", MAPPING, []) == "/v/snapshots"
    assert rewrite_path("/tmpfiles/x", MAPPING, []) == "/tmpfiles/x", "a shared prefix is not a mount"
    assert rewrite_path("/relay-volume-2/x", MAPPING, []) == "/relay-volume-2/x"
    assert rewrite_path("--out=/tmp/x", MAPPING, []) == "--out=/tmp/x", "only whole values that are paths"
    assert rewrite_path("relative/tmp", MAPPING, []) == "relative/tmp"


def test_a_host_path_of_the_image_under_a_mount_path_stays_as_it_is() -> None:
    roots = ["/tmp/plain-clone0/relay", "/tmp/plain-clone0/relay/.venv"]
    relay = "/tmp/plain-clone0/relay/.venv/bin/relay"
    assert rewrite_path(relay, MAPPING, roots) == relay
    assert rewrite_path("/tmp/plain-clone0/relay", MAPPING, roots) == "/tmp/plain-clone0/relay"
    assert rewrite_path("/tmp/plain-clone0/other", MAPPING, roots) == "/pod/volumes/tmp/plain-clone0/other"
    # A mount inside a host root is the more specific one, and wins.
    inner = [("/tmp/plain-clone0/relay/data", "/pod/volumes/data")]
    assert rewrite_path("/tmp/plain-clone0/relay/data/a", inner, roots) == "/pod/volumes/data/a"


def _kubelet(tmp_path: Path) -> ProcessKubelet:
    configuration = kubernetes.client.Configuration()
    configuration.host = "https://127.0.0.1:1"  # never called: _launch touches no API
    return ProcessKubelet(kubernetes.client.ApiClient(configuration), tmp_path / "volume", tmp_path / "work")


def _pod_running(tmp_path: Path, mount_path: str, command: list[str]) -> tuple[int, str]:
    harness = _kubelet(tmp_path)
    pod = LocalPod("ml", "p", "u1", tmp_path / "work" / "u1")
    pod.workdir.mkdir(parents=True)
    obj: dict[str, Any] = {
        "spec": {
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            "containers": [
                {
                    "name": "c",
                    "image": "relay-controller:dev",
                    "command": command,
                    "env": [{"name": "SCRATCH", "value": f"{mount_path}/scratch"}],
                    "volumeMounts": [{"name": "tmp", "mountPath": mount_path}],
                }
            ],
        }
    }
    with open(pod.workdir / "container.log", "wb") as log:
        code = harness._launch(pod, obj, log).wait(timeout=60)
    return code, (pod.workdir / "container.log").read_text()


def test_a_pod_whose_command_lives_under_a_mounted_folder_runs(tmp_path: Path) -> None:
    # The chart's /tmp emptyDir over a command in the harness's own folder (under /tmp here).
    script = tmp_path / "work" / "bin" / "hello"
    script.parent.mkdir(parents=True)
    script.write_text('#!/bin/sh\necho hello from "$0" scratch=$SCRATCH\n')
    script.chmod(0o755)
    code, log = _pod_running(tmp_path, "/tmp", [str(script)])
    assert code == 0, log
    assert f"hello from {script} scratch={tmp_path / 'work' / 'u1' / 'volumes' / 'tmp' / 'scratch'}" in log


def test_a_pod_running_this_checkouts_interpreter_under_a_mounted_ancestor_runs(tmp_path: Path) -> None:
    # Wherever the checkout lives (a clone under /tmp: its parent is under the chart's /tmp mount).
    ancestor = str(REPO_ROOT.parent)
    code, log = _pod_running(tmp_path, ancestor, [sys.executable, "-c", "import os; print(os.environ['SCRATCH'])"])
    assert code == 0, log
    assert log.strip() == str(tmp_path / "work" / "u1" / "volumes" / "tmp" / "scratch")
