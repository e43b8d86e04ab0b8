"""A rolling upgrade of the controller while runs train (envtest, stand-in trainer pods): nothing is disrupted.

The old replica leads alone; three runs start and checkpoint; the new replica starts (its worker polls, it
campaigns), then the old one gets SIGTERM, as a Deployment's rolling update does. The old one releases the Lease
and exits 0, the new one leads, and every run succeeds with its one leg launched once (one pod, one LegStarted
Event): `upgrade_runs_disrupted` is 0. Both replicas run this checkout; that a new version's workflow code replays
the old one's histories is tests/workflow/test_replay.py's job. bench/bench_ha.py runs this with 20 runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes
import pytest

from relay_testing.control_plane import ControlPlane
from relay_testing.ha_scenarios import rolling_upgrade
from relay_testing.process_kubelet import ProcessKubelet
from relay_testing.replicas import ControllerReplica, controller_args

# `make drill` runs it (pytest -m drill), so that make test stays under 20 minutes on 2 cores.
pytestmark = [pytest.mark.cluster, pytest.mark.anyio, pytest.mark.drill]


async def test_a_rolling_upgrade_while_three_runs_train_restarts_no_leg(
    temporal_env: Any,
    control_plane: ControlPlane,
    kube: kubernetes.client.ApiClient,
    crd_installed: Any,
    namespace: str,
    volume_root: Path,
    task_queue: str,
    standin_kubelet: ProcessKubelet,
    tmp_path: Path,
) -> None:
    address = temporal_env.client.service_client.config.target_host
    args = controller_args(address, control_plane.kubeconfig, namespace, volume_root, task_queue)

    def start(name: str) -> ControllerReplica:
        return ControllerReplica(name, args, tmp_path)

    result = await rolling_upgrade(kube, namespace, volume_root, standin_kubelet, start, runs=3, steps=80)
    print(f"rolling upgrade of 3 runs: handover {result.handover_s:.1f} s, all finished in {result.seconds:.0f} s")
    assert result.disrupted == {}, f"upgrade_runs_disrupted = {len(result.disrupted)}: {result.disrupted}"
    assert result.old_exit == 0, "the old replica did not shut down cleanly on SIGTERM"
    assert result.new_exit == 0, "the new replica, after running the runs' activities, did not shut down cleanly"
    assert result.handover_s < 15, f"the new replica led only {result.handover_s:.1f} s after the old one's SIGTERM"
