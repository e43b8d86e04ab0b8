"""A quick spec.suspend true -> false flip never strands a TrainingRun Paused (envtest, operator, stand-in kubelet).

Three runs flip at once, each with its own gap between the two patches: 0 s (both changes may reach the operator
as one watch batch), 0.5 s (the pause signal is in flight) and about the time the leg takes to checkpoint and stop.
Each must finish Succeeded with the weights of an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_k8s_operator import (
    STEPS,
    Cluster,
    controller,  # noqa: F401  (the fixture)
    expected_weights,
    first_checkpoint,
    phase,
    run_spec,
)

from relay_testing.process_kubelet import ProcessKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
GAPS_S = (0.0, 0.5, 1.5)  # the stand-in's leg stops within ~1 s of SIGTERM (0.2 s steps, checkpoint on exit)


async def flip(cluster: Cluster, name: str, gap_s: float) -> None:
    async def set_suspend(value: bool) -> None:
        await asyncio.to_thread(
            cluster.custom.patch_namespaced_custom_object,
            "relay.dev", "v1alpha1", cluster.namespace, "trainingruns", name, {"spec": {"suspend": value}},
        )  # fmt: skip

    await set_suspend(True)
    if gap_s:
        await asyncio.sleep(gap_s)
    await set_suspend(False)


async def test_a_quick_suspend_flip_never_leaves_the_run_paused(
    controller: Any,  # noqa: F811
    kube: Any,
    namespace: str,
    standin_kubelet: ProcessKubelet,
    volume_root: Path,
) -> None:
    standin_kubelet.extra_env.update({"RELAY_STANDIN_STEPS": str(STEPS), "RELAY_STANDIN_STEP_S": "0.2"})
    cluster = Cluster(kube, namespace)
    names = {gap: f"flip-{int(gap * 10)}-{uuid.uuid4().hex[:5]}" for gap in GAPS_S}
    for name in names.values():
        await cluster.apply(name, run_spec())
    runs = volume_root / f"runs/{namespace}"
    await asyncio.gather(*(first_checkpoint(runs / name / "checkpoints", timeout_s=90) for name in names.values()))
    await asyncio.gather(*(flip(cluster, name, gap) for gap, name in names.items()))

    for gap, name in names.items():
        run = await cluster.until(name, phase("Succeeded"), timeout_s=60)
        assert run["spec"]["suspend"] is False, gap
        assert run["status"]["failures"] == 0, (gap, run["status"])
        final = runs / name / "final"
        assert (final / "weights.txt").read_text() == expected_weights(STEPS), gap


async def test_a_run_left_paused_by_a_lost_resume_edge_is_resumed_by_the_reconcile_timer(
    controller: Any,  # noqa: F811
    kube: Any,
    namespace: str,
    standin_kubelet: ProcessKubelet,
    volume_root: Path,
) -> None:
    """The state the bug left behind: Paused, spec.suspend false, and kopf's last-handled record already saying
    false (no diff left for any handler). Only the level-triggered timer can resume it."""
    standin_kubelet.extra_env.update({"RELAY_STANDIN_STEPS": str(STEPS), "RELAY_STANDIN_STEP_S": "0.2"})
    cluster = Cluster(kube, namespace)
    name = f"lost-{uuid.uuid4().hex[:6]}"
    await cluster.apply(name, run_spec(suspend=True))
    paused = await cluster.until(name, phase("Paused"), timeout_s=60)
    key = "relay.dev/last-handled-configuration"
    handled = json.loads(paused["metadata"]["annotations"][key])
    handled["spec"]["suspend"] = False
    patch = {"metadata": {"annotations": {key: json.dumps(handled)}}, "spec": {"suspend": False}}
    await asyncio.to_thread(
        cluster.custom.patch_namespaced_custom_object, "relay.dev", "v1alpha1", namespace, "trainingruns", name, patch
    )
    run = await cluster.until(name, phase("Succeeded"), timeout_s=60)
    assert run["status"]["failures"] == 0
    assert (volume_root / f"runs/{namespace}/{name}/final/weights.txt").read_text() == expected_weights(STEPS)
    assert (await cluster.events(name)).count("Resumed") == 1
