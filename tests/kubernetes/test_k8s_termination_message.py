"""The process kubelet reports a container's termination message as a kubelet does: the file at its
terminationMessagePath (mapped to a file of the pod, wherever the command or env names that path), else, with
FallbackToLogsOnError and a failure, the log's tail; and the leg's verdict leads with it."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import kubernetes
import pytest

from controller.kubernetes.legs import pod_termination
from relay_testing.process_kubelet import ProcessKubelet
from trainer.volume import TERMINATION_LOG_ENV

pytestmark = pytest.mark.cluster

WRITES_ITS_REASON = (
    "import sys\n"
    "from trainer.volume import write_termination_message\n"
    "print('Traceback (most recent call last):', flush=True)\n"
    "write_termination_message('ValueError: warmup needs at least 1 step, got 0')\n"
    "sys.exit(1)\n"
)
ONLY_LOGS = "import sys\nprint('step 3/10')\nprint('ZeroDivisionError: division by zero', flush=True)\nsys.exit(1)\n"


def run_pod(kube: kubernetes.client.ApiClient, namespace: str, code: str, **container: Any) -> dict[str, Any]:
    core = kubernetes.client.CoreV1Api(kube)
    name = f"p-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [{"name": "trainer", "image": "relay-trainer:test", "command": ["python", "-c", code]}
                           | container],
        },
    }  # fmt: skip
    core.create_namespaced_pod(namespace, body)
    deadline = time.monotonic() + 60
    while True:
        pod = core.read_namespaced_pod(name, namespace, _preload_content=False)
        document: dict[str, Any] = json.loads(pod.data)
        if document.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return document
        assert time.monotonic() < deadline, f"pod {name} did not finish"
        time.sleep(0.1)


def test_the_file_named_by_the_env_is_the_message(kube, kubelet: ProcessKubelet, namespace: str) -> None:
    env = [{"name": TERMINATION_LOG_ENV, "value": "/dev/termination-log"}]
    pod = run_pod(kube, namespace, WRITES_ITS_REASON, env=env, terminationMessagePolicy="FallbackToLogsOnError")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 1
    assert terminated["message"] == "ValueError: warmup needs at least 1 step, got 0\n"
    termination = pod_termination(pod)
    assert termination is not None
    assert termination.message.startswith("ValueError: warmup needs at least 1 step, got 0; pod p-")


def test_fallback_to_logs_on_error_reports_the_logs_tail(kube, kubelet: ProcessKubelet, namespace: str) -> None:
    pod = run_pod(kube, namespace, ONLY_LOGS, terminationMessagePolicy="FallbackToLogsOnError")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["message"] == "step 3/10\nZeroDivisionError: division by zero"
    termination = pod_termination(pod)
    assert termination is not None and termination.message.startswith("ZeroDivisionError: division by zero; pod p-")


def test_the_default_policy_reports_only_the_file(kube, kubelet: ProcessKubelet, namespace: str) -> None:
    pod = run_pod(kube, namespace, ONLY_LOGS)
    assert pod["spec"]["containers"][0]["terminationMessagePolicy"] == "File"  # the API server's default
    assert "message" not in pod["status"]["containerStatuses"][0]["state"]["terminated"]
