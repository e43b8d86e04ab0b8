"""The drill on the Kubernetes backend: a seeded eviction, corrupted checkpoint and controller kill lose nothing.

It runs on the session's envtest control plane, pointed at its kubeconfig like at any cluster, with the process
kubelet lent as the node harness (relay_testing.drill.lend), `relay controller` as its own OS process and the
real trainer in every pod. The drill's checks are what a user relies on; this test also checks each fault left
its own evidence. The same drill without the harness (API-level faults only: policy/v1beta1 Eviction here on
1.20, force delete) is the second test. Both run in `make drill` (pytest -m drill), beside the long drills.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from controller.drill import KUBERNETES_FAULTS, format_result, plan
from controller.drill.kubernetes import API_FAULTS, KubernetesDrill
from relay_testing.drill import lend
from relay_testing.process_kubelet import ProcessKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.drill]  # 3-4 minutes: `make drill` runs them, not make test
SEED, FAULTS = 43, 3  # plans sigterm, corrupt-newest, controller-restart (the new controller finishes the run)
# Plans sigterm, then controller-restart. Not sigkill: a force delete (gracePeriodSeconds=0) removes the pod from the
# API before its container has stopped, so the next leg can start beside the old trainer; the drill's overlap check
# then fails, rightly (0.24 s overlap seen under load). Fencing legs (issue 13) is what makes that fault safe.
API_SEED, API_FAULTS_N = 6, 2


def test_kubernetes_drill_evict_controller_kill_and_corruption_lose_nothing(
    control_plane: Any, crd_installed: Any, kubelet: ProcessKubelet, tmp_path: Path
) -> None:
    namespace = f"drill-{uuid.uuid4().hex[:6]}"
    kinds = tuple(k for k in KUBERNETES_FAULTS if k != "enospc")  # ENOSPC is the local drill's test
    out = io.StringIO()
    with lend(control_plane, kubelet, namespace, tmp_path / "volume") as cluster:
        drill = KubernetesDrill(tmp_path, SEED, FAULTS, kinds, cluster=cluster, node=kubelet, out=out)
        result = asyncio.run(drill.execute())
    table = format_result(result)
    assert result.passed, f"{out.getvalue()}\n{table}"

    assert [f.kind for f in result.faults] == [f.kind for f in plan(SEED, FAULTS, kinds)]
    assert [f.kind for f in result.faults] == ["sigterm", "corrupt-newest", "controller-restart"]
    evicted, corrupted, restarted = result.faults
    assert "Eviction of pod" in evicted.detail and evicted.steps_lost == 0  # SIGTERM: the step was saved
    assert "new controller adopted its Job" in restarted.detail and restarted.steps_lost == 0
    assert "flipped a byte" in corrupted.detail and 0 < (corrupted.steps_lost or 0) <= 20
    checks = {check.name: check for check in result.checks}
    assert checks["TrainingRun object says Succeeded"].ok
    assert checks["no Job, pod or process of the run left"].ok
    assert "quarantined [" in checks["every quarantined checkpoint in status and events"].detail

    # Leg pods really ran one after another on the node, and the kubelet no longer runs any of them.
    legs = sorted(key for key in kubelet.spans if key.startswith(f"{namespace}/drill-leg-"))
    assert len(legs) >= 3 and not [key for key in kubelet.running() if key.startswith(namespace)]
    events = kubernetes.client.CoreV1Api(control_plane.api_client()).list_namespaced_event(
        namespace, field_selector="involvedObject.name=drill"
    )
    assert {"Preempted", "CheckpointQuarantined"} <= {event.reason for event in events.items}


def test_kubernetes_drill_with_api_level_faults_only_as_on_a_real_cluster(
    control_plane: Any, crd_installed: Any, kubelet: ProcessKubelet, tmp_path: Path
) -> None:
    """No node harness handed in: Eviction through the version the server offers, then a controller restart."""
    namespace = f"drill-{uuid.uuid4().hex[:6]}"
    out = io.StringIO()
    with lend(control_plane, kubelet, namespace, tmp_path / "volume") as cluster:
        drill = KubernetesDrill(tmp_path, API_SEED, API_FAULTS_N, API_FAULTS, cluster=cluster, out=out)
        result = asyncio.run(drill.execute())
    assert result.passed, f"{out.getvalue()}\n{format_result(result)}"
    assert "Eviction via policy/v1beta1" in out.getvalue()  # envtest here is 1.20: no policy/v1 Eviction yet
    assert [f.kind for f in result.faults] == [f.kind for f in plan(API_SEED, API_FAULTS_N, API_FAULTS)]
    kinds = {f.kind: f for f in result.faults}
    assert {"sigterm", "controller-restart"} <= set(kinds)
    assert "policy/v1beta1: SIGTERM" in kinds["sigterm"].detail and kinds["sigterm"].steps_lost == 0
    checks = {check.name: check for check in result.checks}
    assert checks["legs never overlapped (container start and finish, from the API)"].ok
