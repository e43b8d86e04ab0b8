"""Pure parts of the Kubernetes tier, no cluster: the Job builder, leg verdicts, the generated CRD."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controller.crd import OUTPUTS, crd_manifest
from controller.kubernetes.jobs import ANNOTATION_TERMINATION, build_leg_job, job_name
from controller.kubernetes.legs import judge_leg
from controller.leg_model import LegOutcomeKind, LegSpec, LegState, classify_termination
from controller.spec import MAX_RUN_NAME, TrainingRunSpec

REPO = Path(__file__).resolve().parents[2]


def leg(**spec: Any) -> LegSpec:
    return LegSpec(
        namespace="ml",
        name="bert-sst2",
        leg=3,
        run_path="runs/ml/bert-sst2",
        snapshot_path="snapshots/abc",
        spec=TrainingRunSpec.model_validate({"dataset": {"source": "demo"}, **spec}),
        owner_uid="uid-1",
    )


def test_job_is_one_try_non_root_and_mounts_the_run_folder_and_snapshot() -> None:
    job = build_leg_job(leg(resources={"gpus": 2, "cpu": "4", "memory": "16Gi"}, terminationGracePeriodSeconds=90))
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert job["metadata"]["name"] == "bert-sst2-leg-3"
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert (
        job["metadata"]["ownerReferences"][0] | {"uid": "uid-1", "kind": "TrainingRun", "controller": True}
        == (job["metadata"]["ownerReferences"][0])
    )
    assert container["command"] == [
        "python", "-m", "trainer", "train",
        "--run-dir", "/relay-volume/runs/ml/bert-sst2",
        "--snapshot", "/relay-volume/snapshots/abc",
        "--config", "/relay-volume/runs/ml/bert-sst2/config.json",
        "--generation", "3",
        "--processes", "2",  # gpus: 2 -> one data-parallel process per GPU (issue 14)
    ]  # fmt: skip
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"}
    assert pod["terminationGracePeriodSeconds"] == 90
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/relay-volume/snapshots/abc"]["readOnly"] is True
    assert mounts["/relay-volume/runs/ml/bert-sst2"]["subPath"] == "runs/ml/bert-sst2"
    assert "/tmp" in mounts
    assert {"OMP_NUM_THREADS": "4"}.items() <= {e["name"]: e["value"] for e in container["env"]}.items()
    # Why a leg failed reaches the pod status: the trainer writes it where the kubelet reads it.
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["RELAY_TERMINATION_LOG"] == container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "relay-controller" and labels["relay.dev/leg"] == "3"


def test_cpu_only_leg_asks_for_no_gpu_and_fallback_profile_and_kueue_label_apply() -> None:
    spec = {
        "scheduling": {
            "nodeSelector": {"pool": "spot"},
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            "kueueQueue": "team-a",
            "fallback": {"nodeSelector": {"pool": "on-demand"}, "priorityClassName": "high"},
            "fallbackAfterPreemptions": 2,
        }
    }
    normal = build_leg_job(leg(**spec))
    fallback = build_leg_job(leg(**spec).model_copy(update={"use_fallback_profile": True}))
    container = normal["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert normal["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert normal["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "spot"}
    assert normal["spec"]["template"]["spec"]["tolerations"][0]["key"] == "spot"
    assert fallback["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "on-demand"}
    assert fallback["spec"]["template"]["spec"]["priorityClassName"] == "high"
    assert "tolerations" not in fallback["spec"]["template"]["spec"]


def test_job_names_fit_a_dns_label_for_the_longest_run_name() -> None:
    assert len(job_name("a" * MAX_RUN_NAME, 10**9)) <= 63
    with pytest.raises(ValueError, match=r"metadata\.name"):
        job_name("a" * 60, 1)


def _pod(name: str, created: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "creationTimestamp": created}, "spec": {}, "status": status}


JOB: dict[str, Any] = {"metadata": {"name": "r-leg-0", "annotations": {}}, "spec": {"parallelism": 1}, "status": {}}


def test_oom_killed_container_and_a_crash_are_failures_an_eviction_is_a_preemption() -> None:
    oom = _pod(
        "p", "2026-01-01T00:00:00Z", phase="Failed",
        containerStatuses=[{"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}],
    )  # fmt: skip
    crash = _pod(
        "p", "2026-01-01T00:00:00Z", phase="Failed",
        containerStatuses=[{"name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}],
    )  # fmt: skip
    verdict = judge_leg(JOB, [oom], [], now=0, stuck_after_s=60)
    assert verdict.observation.termination.reason == "OOMKilled" and verdict.halt and verdict.record
    assert classify_termination(verdict.observation.termination) == LegOutcomeKind.FAILED
    evicted = _pod(
        "p", "2026-01-01T00:00:00Z", phase="Failed", reason="Evicted", message="The node was low on resource: memory.",
        containerStatuses=[{"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}],
    )  # fmt: skip
    pressure = judge_leg(JOB, [evicted], [], now=0, stuck_after_s=60).observation.termination
    assert classify_termination(pressure) == LegOutcomeKind.PREEMPTED
    failed = judge_leg(JOB, [crash], [], now=0, stuck_after_s=60).observation.termination
    assert classify_termination(failed) == LegOutcomeKind.FAILED


def test_disruption_target_condition_marks_a_newer_clusters_preemption() -> None:
    pod = _pod(
        "p", "2026-01-01T00:00:00Z", phase="Failed",
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
        containerStatuses=[{"name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}],
    )  # fmt: skip
    termination = judge_leg(JOB, [pod], [], now=0, stuck_after_s=60).observation.termination
    assert termination.disrupted and termination.reason == "PreemptionByScheduler"
    assert classify_termination(termination) == LegOutcomeKind.PREEMPTED


def test_image_pull_backoff_is_pending_until_the_deadline_then_stuck() -> None:
    pod = _pod(
        "p", "2026-01-01T00:00:00Z", phase="Pending",
        containerStatuses=[{"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "x"}}}],
    )  # fmt: skip
    created = 1767225600.0  # 2026-01-01T00:00:00Z
    early = judge_leg(JOB, [pod], [], now=created + 10, stuck_after_s=60)
    late = judge_leg(JOB, [pod], [], now=created + 61, stuck_after_s=60)
    assert early.observation.state == LegState.PENDING and "ImagePullBackOff" in early.observation.detail
    assert late.observation.termination.stuck and late.halt
    assert classify_termination(late.observation.termination) == LegOutcomeKind.STUCK


def test_terminating_pod_keeps_the_leg_running_and_halts_the_job() -> None:
    pod = _pod("p", "2026-01-01T00:00:00Z", phase="Running")
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    replacement = _pod("q", "2026-01-01T00:00:30Z", phase="Pending")
    verdict = judge_leg(JOB, [pod, replacement], [], now=0, stuck_after_s=60)
    assert verdict.observation.state == LegState.RUNNING and verdict.halt and not verdict.record


def test_recorded_termination_outlives_the_pods() -> None:
    job = json.loads(json.dumps(JOB))
    job["metadata"]["annotations"][ANNOTATION_TERMINATION] = json.dumps({"exit_code": 75, "disrupted": True})
    observation = judge_leg(job, [], [], now=0, stuck_after_s=60).observation
    assert observation.state == LegState.TERMINATED and observation.termination.exit_code == 75
    assert judge_leg(None, [], [], now=0, stuck_after_s=60).observation.state == LegState.MISSING


def test_crd_schema_carries_validation_printer_columns_and_short_name() -> None:
    crd = crd_manifest()
    version = crd["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert crd["spec"]["names"]["shortNames"] == ["tr"] and version["subresources"] == {"status": {}}
    assert (
        spec["properties"]["resources"]["properties"]["gpus"] | {"minimum": 0, "maximum": 16}
        == (spec["properties"]["resources"]["properties"]["gpus"])
    )
    assert spec["properties"]["dataset"]["properties"]["source"]["enum"] == ["demo", "csv", "jsonl", "parquet", "hub"]
    assert [c["name"] for c in version["additionalPrinterColumns"]][:7] == [
        "Phase", "Progress", "Step", "Legs", "Preemptions", "Checkpoint age", "Age",
    ]  # fmt: skip
    assert "$ref" not in json.dumps(crd) and "anyOf" not in json.dumps(crd)


def test_committed_crd_files_match_the_models() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller.crd", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert all(path.is_file() for path in OUTPUTS)


def test_drift_check_fails_naming_the_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import controller.crd as crd

    stale = tmp_path / "manifests" / "trainingruns.relay.dev.yaml"
    stale.parent.mkdir()
    stale.write_text("# hand-edited\n")
    monkeypatch.setattr(crd, "OUTPUTS", (stale,))
    monkeypatch.setattr(crd, "REPO_ROOT", tmp_path)
    assert crd.main(["--check"]) == 1
    assert crd.main([]) == 0 and crd.main(["--check"]) == 0


@pytest.mark.parametrize(
    ("authorization", "token"),
    [("bearer abc.def", "abc.def"), ("Bearer abc.def", "abc.def"), ("abc.def", "abc.def"), ("", None)],
)
def test_login_token_from_in_cluster_and_kubeconfig_forms(authorization: str, token: str | None) -> None:
    """In-cluster config stores "bearer <token>" (lower case); kopf must get the bare token either way."""
    from controller.kubernetes.main import bearer_token

    assert bearer_token(authorization) == token


# ---------------------------------------------------------------- lost legs (issue 13)

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def _at(seconds: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(T0 + seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _running_on(node: str, phase: str = "Running") -> dict[str, Any]:
    pod = _pod("r-leg-0-x", _at(0), phase=phase, startTime=_at(0))
    pod["spec"]["nodeName"] = node
    return pod


def _node(ready: str, since: float) -> dict[str, Any]:
    condition = {"type": "Ready", "status": ready, "lastTransitionTime": _at(since)}
    return {"metadata": {"name": "n1"}, "status": {"conditions": [condition]}}


def _judge(pod: dict[str, Any], now: float, **limits: Any) -> Any:
    from controller.kubernetes.legs import LostLegLimits

    return judge_leg(JOB, [pod], [], now=T0 + now, stuck_after_s=60, lost=LostLegLimits(**limits))


@pytest.mark.parametrize("ready", ["False", "Unknown"])
def test_a_node_not_ready_past_the_threshold_loses_the_leg(ready: str) -> None:
    pod, node = _running_on("n1"), _node(ready, since=100)
    before = _judge(pod, 100 + 29.5, node=node, node_lost_after_s=30)
    after = _judge(pod, 100 + 30, node=node, node_lost_after_s=30)
    assert before.observation.state == LegState.RUNNING and not before.force_delete
    termination = after.observation.termination
    assert after.observation.state == LegState.TERMINATED and after.force_delete and after.halt and after.record
    assert termination is not None and termination.reason == "NodeLost"
    assert f"node n1 Ready={ready} for 30s (nodeLostAfterSeconds 30)" in termination.message
    assert classify_termination(termination) == LegOutcomeKind.PREEMPTED


def test_a_ready_node_and_a_node_that_came_back_keep_the_leg() -> None:
    pod = _running_on("n1")
    assert _judge(pod, 500, node=_node("True", since=100), node_lost_after_s=30).observation.state == LegState.RUNNING
    assert _judge(pod, 500, node=None, node_lost_after_s=30).observation.state == LegState.RUNNING


def test_a_pod_in_phase_unknown_is_lost_at_once() -> None:
    verdict = _judge(_running_on("n1", phase="Unknown"), 5, node=None)
    termination = verdict.observation.termination
    assert verdict.force_delete and termination is not None and termination.reason == "NodeLost"
    assert "phase Unknown" in termination.message
    assert classify_termination(termination) == LegOutcomeKind.PREEMPTED


def test_a_running_pod_without_progress_for_the_stall_limit_is_lost() -> None:
    pod = _running_on("n1")
    moving = _judge(pod, 700, progress_at=T0 + 650, progress_stall_s=60)
    stalled = _judge(pod, 700, progress_at=T0 + 640, progress_stall_s=60)
    assert moving.observation.state == LegState.RUNNING
    termination = stalled.observation.termination
    assert stalled.force_delete and termination is not None and termination.reason == "ProgressStalled"
    assert "no progress for 60s (progressStallSeconds 60)" in termination.message
    assert classify_termination(termination) == LegOutcomeKind.PREEMPTED


def test_a_lost_node_is_judged_even_while_its_pod_is_being_deleted() -> None:
    pod = _running_on("n1")
    pod["metadata"]["deletionTimestamp"] = _at(50)  # the taint manager's eviction, never carried out by the node
    verdict = _judge(pod, 200, node=_node("Unknown", since=10), node_lost_after_s=60)
    assert verdict.observation.state == LegState.TERMINATED and verdict.force_delete
