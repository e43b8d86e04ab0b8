"""Newer Kubernetes APIs used only where the server has them, and the old ones otherwise: pure, no cluster.

The envtest tier runs 1.20 (no policy/v1, no podFailurePolicy, no DisruptionTarget); users run 1.28-1.34.
Both paths are checked here from manifests, /version strings, discovery lists and pod/Job dicts.
"""

from __future__ import annotations

from typing import Any

import pytest

from controller.kubernetes.jobs import ANNOTATION_WORKFLOW, POD_FAILURE_POLICY, build_leg_job, build_predict_job
from controller.kubernetes.legs import judge_leg
from controller.kubernetes.server import ServerFeatures, eviction_body, eviction_version_of, parse_version
from controller.kubernetes.status_sink import claim_problem
from controller.leg_model import LegOutcomeKind, LegSpec, PredictJob, classify_termination
from controller.spec import CustomResourceStatus, ResourceCondition, TrainingRunSpec, workflow_id
from controller.status import RunStatus

SPEC = TrainingRunSpec.model_validate({"dataset": {"source": "demo"}})
LEG = LegSpec(namespace="ml", name="bert", leg=0, run_path="runs/ml/bert", snapshot_path="snapshots/a", spec=SPEC)
JOB: dict[str, Any] = {"metadata": {"name": "bert-leg-0", "annotations": {}}, "spec": {"parallelism": 1}, "status": {}}


# /api/v1 discovery's pods/eviction entry: policy/v1beta1 up to 1.21 (when policy/v1 served only
# PodDisruptionBudget), policy/v1 from 1.22; an entry without group/version means the old body too.
@pytest.mark.parametrize(
    ("major", "minor", "eviction", "policy", "pod_failure_policy"),
    [
        ("1", "20", ("policy", "v1beta1"), "v1beta1", False),  # the envtest tier
        ("1", "20", (None, None), "v1beta1", False),
        ("1", "21", ("policy", "v1beta1"), "v1beta1", False),
        ("1", "24", ("policy", "v1"), "v1", False),
        ("1", "26", ("policy", "v1"), "v1", True),
        ("1", "28+", ("policy", "v1"), "v1", True),  # managed clusters report "28+"
        ("1", "34", ("policy", "v1"), "v1", True),
    ],
)
def test_server_features_follow_version_and_discovery(
    major: str, minor: str, eviction: tuple[str | None, str | None], policy: str, pod_failure_policy: bool
) -> None:
    resources = [("pods", None, None), ("pods/eviction", *eviction), ("pods/log", None, None)]
    features = ServerFeatures(*parse_version(major, minor), eviction_version_of(resources))
    assert features.pod_failure_policy is pod_failure_policy
    assert features.policy_version == policy
    assert eviction_body("ml", "p", features.policy_version).api_version == f"policy/{policy}"


def test_unreadable_version_names_the_field() -> None:
    with pytest.raises(ValueError, match="minor 'x'"):
        parse_version("1", "x")


def test_pod_failure_policy_only_when_the_server_has_it() -> None:
    old = build_leg_job(LEG)
    new = build_leg_job(LEG, pod_failure_policy=True)
    assert "podFailurePolicy" not in old["spec"]
    assert new["spec"]["podFailurePolicy"] == POD_FAILURE_POLICY
    assert new["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # the API requires it with a policy
    rules = POD_FAILURE_POLICY["rules"]
    assert {r["action"] for r in rules} == {"FailJob"}  # never Ignore: no second pod for one leg
    assert rules[1]["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [75]}
    assert {k: v for k, v in new["spec"].items() if k != "podFailurePolicy"} == old["spec"]
    job = PredictJob(
        namespace="ml",
        name="bert",
        request_id="0123abcd",
        model_path="runs/ml/bert/final",
        read_paths=["runs/ml/bert/final"],
        work_path="runs/ml/bert/predictions/0123abcd",
        texts=["a"],
        timeout_s=60,
    )
    assert "podFailurePolicy" not in build_predict_job(job, SPEC)["spec"]
    assert build_predict_job(job, SPEC, pod_failure_policy=True)["spec"]["podFailurePolicy"] == POD_FAILURE_POLICY


def test_leg_job_names_its_workflow_by_the_one_helper() -> None:
    assert build_leg_job(LEG)["metadata"]["annotations"][ANNOTATION_WORKFLOW] == workflow_id("ml", "bert")


def _failed_pod(**status: Any) -> dict[str, Any]:
    terminated = {"exitCode": 137, "reason": "Error"}
    return {
        "metadata": {"name": "bert-leg-0-x", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {},
        "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}
        | status,
    }


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ({"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]}, None),
        ({"reason": "Evicted", "message": "The node was low on resource: memory."}, "Evicted"),  # 1.20
    ],
    ids=["DisruptionTarget-1.26+", "status.reason-1.20"],
)
def test_an_evicted_pod_is_a_preemption_on_old_and_new_servers(status: dict[str, Any], reason: str | None) -> None:
    termination = judge_leg(JOB, [_failed_pod(**status)], [], now=0, stuck_after_s=60).observation.termination
    assert termination is not None and termination.disrupted
    assert classify_termination(termination) == LegOutcomeKind.PREEMPTED


@pytest.mark.parametrize(
    ("message", "kind", "exit_code"),
    [
        (
            "Container trainer for pod ml/bert-leg-0-x failed with exit code 75 matching FailJob rule at index 1",
            LegOutcomeKind.PREEMPTED,
            75,
        ),
        (
            "Pod ml/bert-leg-0-x has condition DisruptionTarget matching FailJob rule at index 0",
            LegOutcomeKind.PREEMPTED,
            None,
        ),
        (
            "Container trainer for pod ml/bert-leg-0-x failed with exit code 1 matching FailJob rule at index 1",
            LegOutcomeKind.FAILED,
            1,
        ),
    ],
)
def test_a_job_failed_by_its_pod_failure_policy_is_read_when_the_pods_are_gone(
    message: str, kind: LegOutcomeKind, exit_code: int | None
) -> None:
    job = {
        **JOB,
        "status": {
            "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": message}]
        },
    }
    termination = judge_leg(job, [], [], now=0, stuck_after_s=60).observation.termination
    assert termination is not None and termination.exit_code == exit_code and termination.reason == "PodFailurePolicy"
    assert classify_termination(termination) == kind


def test_a_job_failed_without_a_policy_stays_a_failure() -> None:
    job = {**JOB, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    termination = judge_leg(job, [], [], now=0, stuck_after_s=60).observation.termination
    assert termination is not None and not termination.disrupted
    assert classify_termination(termination) == LegOutcomeKind.FAILED


def test_claim_condition_names_the_claim_and_the_fix() -> None:
    pending = {"spec": {"storageClassName": "standard"}, "status": {"phase": "Pending"}}
    reason, message = claim_problem("relay-shared", "ml", pending) or ("", "")
    assert reason == "ClaimPending"
    assert message.startswith("claim relay-shared is Pending (StorageClass standard): set persistence.storageClassName")
    assert "persistence.existingClaim" in message
    assert claim_problem("relay-shared", "ml", None) == (
        "ClaimNotFound",
        "claim relay-shared not found in ml: create it, or set persistence.storageClassName to an RWX class, "
        "or persistence.existingClaim",
    )
    assert claim_problem("relay-shared", "ml", {"status": {"phase": "Bound"}}) is None
    lost = {"spec": {"volumeName": "pv-ml"}, "status": {"phase": "Lost"}}
    assert claim_problem("relay-shared", "ml", lost) == (
        "ClaimLost",
        "claim relay-shared is Lost: its PersistentVolume pv-ml is gone; the checkpoints were on it. "
        "Restore that volume, or point spec.storage.claimName at another claim",
    )
    status = CustomResourceStatus.from_run_status(RunStatus())
    status.conditions.append(ResourceCondition(type="VolumeReady", status="False", reason=reason))
    assert CustomResourceStatus.model_validate(status.model_dump()).conditions[0].type == "VolumeReady"


class _FakeApi:
    """Answers the sink's three calls and counts them; the claim turns Bound after `pending_reads` reads."""

    def __init__(self, pending_reads: int) -> None:
        self.pending_reads = pending_reads
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def get_namespaced_custom_object(self, *_: Any) -> dict[str, Any]:
        self._count("get_run")
        return {"metadata": {"uid": "u"}, "spec": {"storage": {"claimName": "relay-shared"}}}

    def patch_namespaced_custom_object_status(self, *args: Any) -> dict[str, Any]:
        self._count("patch_status")
        self.last_status = args[-1]["status"]
        return {"metadata": {"uid": "u"}}

    def read_namespaced_persistent_volume_claim(self, *_: Any) -> dict[str, Any]:
        self._count("read_claim")
        phase = "Pending" if self.calls["read_claim"] <= self.pending_reads else "Bound"
        return {"spec": {}, "status": {"phase": phase}}

    def create_namespaced_event(self, _namespace: str, body: dict[str, Any]) -> None:
        self._count(f"event:{body['reason']}")


def test_the_sink_reads_a_claim_until_it_is_bound_and_then_never_again() -> None:
    import asyncio

    import kubernetes

    from controller.kubernetes.status_sink import KubernetesStatusSink

    fake = _FakeApi(pending_reads=2)
    sink = KubernetesStatusSink(kubernetes.client.ApiClient())
    sink._custom = sink._core = fake  # type: ignore[assignment]

    async def publish_times(count: int) -> list[list[str]]:
        seen = []
        for _ in range(count):
            await sink.publish("ml", "bert", RunStatus(), [])
            seen.append([c["type"] for c in fake.last_status["conditions"]])
        return seen

    seen = asyncio.run(publish_times(6))
    assert seen == [["VolumeReady"], ["VolumeReady"], [], [], [], []]
    assert fake.calls == {
        "get_run": 1,  # the claim's name, once per run
        "read_claim": 3,  # until Bound, then never again
        "patch_status": 6,
        "event:ClaimPending": 1,  # once when it appears, not at every publish
        "event:ClaimBound": 1,
    }
