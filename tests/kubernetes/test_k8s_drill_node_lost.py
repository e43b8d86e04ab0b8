"""`relay drill --kinds node-lost` on envtest (issue 13): a leg's node is cut off twice, nothing is lost.

The drill runs with two process kubelets lent as one node harness (relay_testing.drill.lend_nodes). Each fault
partitions the node running the leg (no more status reports, Ready=Unknown) while its real trainer keeps training
and writing the shared volume; the controller must call the leg NodeLost after nodeLostAfterSeconds (5 s in the
drill's run) and start the next leg on the other node; the old trainer must end fenced (exit 76) with nothing
committed after the fence moved; then the node comes back Ready. The drill's overlap check allows a cut-off leg to
overlap the next only on those terms. Marked `drill`: `make drill` runs it, `make test` does not.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from controller.drill import format_result, plan
from controller.drill.kubernetes import KubernetesDrill
from relay_testing.drill import lend_nodes
from relay_testing.process_kubelet import ProcessKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.drill]
SEED, FAULTS, KINDS = 7, 2, ("node-lost",)


def test_kubernetes_drill_node_lost_fences_the_cut_off_trainer_and_loses_nothing(
    control_plane: Any, crd_installed: Any, kubelet: ProcessKubelet, tmp_path: Path
) -> None:
    namespace = f"drill-{uuid.uuid4().hex[:6]}"
    out = io.StringIO()
    with lend_nodes(control_plane, kubelet, namespace, tmp_path / "volume", tmp_path / "spare") as (cluster, nodes):
        drill = KubernetesDrill(tmp_path, SEED, FAULTS, KINDS, cluster=cluster, node=nodes, out=out)
        result = asyncio.run(drill.execute())
        logs = {pod: nodes.pod_log(namespace, pod) for pod in drill.fenced}
        lost_node_ready = [node.partitioned for node in nodes.nodes]
    table = format_result(result)
    assert result.passed, f"{out.getvalue()}\n{table}"
    assert [f.kind for f in result.faults] == [f.kind for f in plan(SEED, FAULTS, KINDS)] == ["node-lost"] * 2

    for fault in result.faults:
        assert "Ready=Unknown" in fault.detail and "exit 76 (fenced)" in fault.detail, fault.detail
        assert "no commit after the fence" in fault.detail and "Ready=True" in fault.detail, fault.detail
    assert len(drill.fenced) == 2 and all(leg.ok for leg in drill.fenced.values())
    for pod, log in logs.items():
        leg = int(pod.removeprefix("drill-leg-").split("-")[0])
        assert f"fenced: leg {leg} superseded by leg {drill.fenced[pod].newer}" in log, log[-2000:]
    assert lost_node_ready == [False, False]  # both nodes report again

    checks = {check.name.split(" (")[0]: check for check in result.checks}
    overlap = checks["legs never overlapped, but for a cut-off leg that ended fenced"]
    assert overlap.ok, overlap.detail
    assert "no checkpoint, progress.json or history.jsonl record of its pid after the fence moved" in overlap.name
    assert checks["trainer processes never overlapped"].ok
    run: Any = kubernetes.client.CustomObjectsApi(control_plane.api_client()).get_namespaced_custom_object(
        "relay.dev", "v1alpha1", namespace, "trainingruns", "drill"
    )
    reasons = [leg.get("reason") or "" for leg in run["status"]["legs"]]
    assert sum("NodeLost" in reason for reason in reasons) == 2, run["status"]["legs"]
