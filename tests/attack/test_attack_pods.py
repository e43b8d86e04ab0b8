"""Attack tier, issue 11 "Pods and endpoints" and "Validation gaps" (pod part). Manifests compared.

Findings (reproduced before this change):
- leg and predict pods lacked `fsGroupChangePolicy: OnRootMismatch`, so the kubelet chowned the whole claim
  (every run's checkpoints) at every leg start;
- a model stored on the volume was never mounted into the leg Job: config.json named
  /relay-volume/<model>, which the pod did not have, so volume models could not work on Kubernetes.
  The model is now mounted read-only, a subPath of the claim, as predict Jobs already mount theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controller.kubernetes.jobs import build_leg_job, build_predict_job
from controller.leg_model import LegSpec, PredictJob
from controller.spec import TrainingRunSpec, volume_model


def spec(**fields: Any) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate({"dataset": {"source": "demo"}, **fields})


def leg(model: str = "tiny") -> LegSpec:
    return LegSpec(
        namespace="ml",
        name="bert",
        leg=0,
        run_path="runs/ml/bert",
        snapshot_path="snapshots/" + "a" * 64,
        spec=spec(model=model),
        owner_uid="uid-1",
    )


def claim_mounts(job: dict[str, Any]) -> list[dict[str, Any]]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return [m for m in container["volumeMounts"] if m["name"] == "relay-volume"]


def test_leg_and_predict_pods_do_not_chown_the_whole_claim_at_each_start() -> None:
    predict = PredictJob(
        namespace="ml",
        name="bert",
        request_id="0123abcd",
        model_path="runs/ml/bert/final",
        read_paths=["runs/ml/bert/final"],
        work_path="runs/ml/bert/predictions/0123abcd",
        texts=["good"],
        timeout_s=60,
    )
    for job in (build_leg_job(leg()), build_predict_job(predict, spec())):
        context = job["spec"]["template"]["spec"]["securityContext"]
        assert context["fsGroup"] == 1000 and context["fsGroupChangePolicy"] == "OnRootMismatch"
    assert claim_mounts(build_predict_job(predict, spec()))[0] == {
        "name": "relay-volume",
        "mountPath": "/relay-volume/runs/ml/bert/final",
        "subPath": "runs/ml/bert/final",
        "readOnly": True,
    }


def test_a_volume_model_is_mounted_read_only_into_the_leg(tmp_path: Path) -> None:
    (tmp_path / "models" / "base-bert").mkdir(parents=True)
    model = volume_model("./models/base-bert/", tmp_path)
    assert model == "models/base-bert"
    assert claim_mounts(build_leg_job(leg("./models/base-bert/"), model_path=model)) == [
        {"name": "relay-volume", "mountPath": "/relay-volume/runs/ml/bert", "subPath": "runs/ml/bert"},
        {
            "name": "relay-volume",
            "mountPath": "/relay-volume/snapshots/" + "a" * 64,
            "subPath": "snapshots/" + "a" * 64,
            "readOnly": True,
        },
        {
            "name": "relay-volume",
            "mountPath": "/relay-volume/models/base-bert",
            "subPath": "models/base-bert",
            "readOnly": True,
        },
    ]


def test_tiny_and_hub_models_mount_nothing_more(tmp_path: Path) -> None:
    # The kubelet would create a missing subPath on the claim: a hub id is never mounted.
    for model in ("tiny", "bert-base-uncased", "google/bert_uncased_L-2_H-128_A-2"):
        assert volume_model(model, tmp_path) is None
    assert len(claim_mounts(build_leg_job(leg("google/bert_uncased_L-2_H-128_A-2")))) == 2
