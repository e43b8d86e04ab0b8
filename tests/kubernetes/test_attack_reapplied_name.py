"""Attack tier, issue 11 item 1 (names are reused across objects), cluster tier.

Finding: re-applying a deleted run's name with the same spec "resumed" the old finished model and was Succeeded
in 1 s; with another spec it failed "config differs" at Progress 100%. The new object now gets a workflow of its
own, trains from step 0, and the old folder is kept under runs/<ns>/.previous/, named in a PreviousRunKept Event.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from test_k8s_operator import Cluster, controller, phase, run_spec  # noqa: F401  (controller: a fixture)

from relay_testing.process_kubelet import ProcessKubelet
from trainer.volume.ownership import read_owner_uid

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
STEPS = 10


@pytest.mark.usefixtures("controller")
async def test_a_new_object_with_a_deleted_runs_name_trains_from_zero(
    kube: Any, namespace: str, standin_kubelet: ProcessKubelet, volume_root: Path
) -> None:
    standin_kubelet.extra_env.update({"RELAY_STANDIN_STEPS": str(STEPS), "RELAY_STANDIN_STEP_S": "0.05"})
    cluster = Cluster(kube, namespace)
    name = f"reuse-{uuid.uuid4().hex[:6]}"
    first = await cluster.apply(name, run_spec(training={"maxSteps": STEPS, "checkpointEverySteps": 5}))
    await cluster.until(name, phase("Succeeded"), timeout_s=120)
    await cluster.delete_and_wait_gone(name, 60, "the first object was not removed")

    second = await cluster.apply(name, run_spec(training={"maxSteps": STEPS, "checkpointEverySteps": 5}))
    run = await cluster.until(name, phase("Succeeded"), timeout_s=120)
    legs = run["status"]["legs"]
    assert legs and legs[0]["startStep"] == 0, f"the new object resumed the old one: {legs}"
    assert "PreviousRunKept" in await cluster.events(name)
    run_dir = volume_root / f"runs/{namespace}/{name}"
    assert read_owner_uid(run_dir) == second["metadata"]["uid"]
    (kept,) = (volume_root / f"runs/{namespace}/.previous").iterdir()
    assert kept.name.startswith(f"{name}-{first['metadata']['uid'][:8]}-") and (kept / "final").is_dir()
