"""Attack tier, issue 11 item 2 (cluster tier): a leg Job never mounts another namespace's model.

Finding: a model stored on the volume is mounted read-only into the leg Job (controller.spec.volume_model);
prepare_run refuses `model: models/other-ns/...`, but a workflow started by hand skips prepare_run, and a link
in the namespace's own models/ folder pointed the mount elsewhere. launch now checks the model folder, symlinks
resolved, with trainer.volume.tenancy before any Job is built.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from conftest import make_training_run

from controller.backends.base import RunIdentityMismatch
from controller.kubernetes.backend import KubernetesBackend
from controller.leg_model import LegSpec
from controller.spec import TrainingRunSpec

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]


def _spec(model: str) -> dict[str, Any]:
    return {"model": model, "dataset": {"source": "demo", "maxRows": 40}, "training": {"maxSteps": 4}}


@pytest.mark.parametrize("how", ["named", "linked"])
async def test_launch_refuses_to_mount_another_namespaces_model(
    control_plane: Any, crd_installed: Any, kube: Any, namespace: str, volume_root: Path, how: str
) -> None:
    theirs = volume_root / "models/other-ns/bert"
    theirs.mkdir(parents=True, exist_ok=True)
    model = "models/other-ns/bert"
    if how == "linked":
        model = f"models/{namespace}/bert-{uuid.uuid4().hex[:6]}"
        (volume_root / model).parent.mkdir(parents=True, exist_ok=True)
        (volume_root / model).symlink_to(theirs)
    name = f"model-{uuid.uuid4().hex[:6]}"
    uid = make_training_run(kube, namespace, name, _spec(model))
    backend = KubernetesBackend(control_plane.api_client(), volume_root=volume_root, api_retry_s=10.0)
    leg = LegSpec(
        namespace=namespace,
        name=name,
        leg=0,
        run_path=f"runs/{namespace}/{name}",
        snapshot_path=f"snapshots/{'0' * 64}",
        spec=TrainingRunSpec.model_validate(_spec(model)),
        owner_uid=uid,
    )
    try:
        message = f"spec.model 'models/other-ns/bert': namespace {namespace!r} reads only models/{namespace}/"
        with pytest.raises(RunIdentityMismatch, match=re.escape(message)):
            await backend.launch(leg)
        jobs = kubernetes.client.BatchV1Api(kube).list_namespaced_job(namespace).items
        assert jobs == []
    finally:
        await backend.close()
