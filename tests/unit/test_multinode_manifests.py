"""Multi-node legs (issue 14, item 2): resources.nodes makes the world nodes x processes per node, the leg command
carries `--processes <per node> --nnodes M`, and the local backend (one machine) refuses it naming the field. On
Kubernetes such a leg is one Indexed Job (completions = parallelism = M, backoffLimit 0) with a headless Service
owned by it, index 0 being the c10d rendezvous `<job>-0.rdzv-<job>:29400`; the TrainingRun's Kueue labels go onto the
Job, created suspended for Kueue; both manifests are valid against a recent Kubernetes schema (kubernetes-validate);
a server older than 1.24 (no Indexed Jobs) is refused naming resources.nodes and its version."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from pydantic import ValidationError

from controller.backends.base import RunIdentityMismatch
from controller.backends.local import LocalBackend
from controller.kubernetes.backend import multinode_refusal
from controller.kubernetes.jobs import build_leg_job, build_rendezvous_service
from controller.kubernetes.server import ServerFeatures
from controller.leg_model import LegSpec
from controller.spec import TrainingRunSpec

KUBE_VERSION = "1.33.0"  # a recent schema (users run 1.28 to 1.34); strict: unknown fields are errors

REPO = Path(__file__).resolve().parents[2]


def leg(leg_number: int = 3, scheduling: dict[str, Any] | None = None, **resources: Any) -> LegSpec:
    spec = {"dataset": {"source": "demo"}, "resources": resources, "scheduling": scheduling or {}}
    return LegSpec(
        namespace="ml",
        name="bert",
        leg=leg_number,
        run_path="runs/ml/bert",
        snapshot_path="snapshots/abc",
        owner_uid="run-uid",
        spec=TrainingRunSpec.model_validate(spec),
    )


def valid(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except jsonschema.ValidationError as exc:
        pytest.fail(f"{obj['kind']}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")


def created(job: dict[str, Any]) -> dict[str, Any]:
    """The Job as the API server returns it: with a uid."""
    return {**job, "metadata": {**job["metadata"], "uid": "job-uid"}}


def test_world_size_is_nodes_times_processes_per_node() -> None:
    resources = leg(nodes=2, gpus=8).spec.resources
    assert (resources.nodes, resources.processes_per_node, resources.world_size) == (2, 8, 16)
    assert leg().spec.resources.nodes == 1 and leg().spec.resources.world_size == 1
    assert leg(nodes=3).spec.resources.world_size == 3  # one process on each of 3 nodes


def test_leg_command_names_processes_per_node_and_nodes() -> None:
    assert leg(nodes=2, processes=2).trainer_args("/v")[-4:] == ["--processes", "2", "--nnodes", "2"]
    assert leg(nodes=2).trainer_args("/v")[-4:] == ["--processes", "1", "--nnodes", "2"]
    assert "--nnodes" not in leg(processes=2).trainer_args("/v")


@pytest.mark.parametrize("nodes", [0, -1, 65])
def test_a_node_count_out_of_range_is_refused_naming_the_field(nodes: int) -> None:
    with pytest.raises(ValidationError, match=r"resources\.nodes"):
        leg(nodes=nodes)


def test_local_backend_refuses_a_multi_node_leg(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    with pytest.raises(RunIdentityMismatch, match=r"spec.resources.nodes: 2 nodes need the Kubernetes backend"):
        asyncio.run(backend.launch(leg(nodes=2)))
    assert not (tmp_path / "runs").exists()  # nothing started, no leg files


def test_relay_run_refuses_a_multi_node_run_before_starting_anything(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text(
        "apiVersion: relay.dev/v1alpha1\nkind: TrainingRun\nmetadata:\n  name: mn\nspec:\n"
        + textwrap.indent("model: tiny\ndataset: {source: demo}\nresources: {nodes: 2}\n", "  ")
    )
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", "run", str(file), "--volume", str(tmp_path / "volume")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "spec.resources.nodes: 2 nodes need the Kubernetes backend" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "volume" / "temporal.db").exists()


def test_a_multi_node_leg_is_one_indexed_job_that_fails_whole() -> None:
    job = build_leg_job(leg(nodes=2, processes=2), pod_failure_policy=True)
    spec = job["spec"]
    assert job["metadata"]["name"] == "bert-leg-3"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed", 2, 2, 0,
    )  # fmt: skip
    assert spec["podFailurePolicy"]["rules"][0]["action"] == "FailJob"  # a disrupted pod fails the whole leg
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "rdzv-bert-leg-3" and "hostname" not in pod  # the Job names pod i <job>-i
    container = pod["containers"][0]
    assert container["command"][-6:] == [
        "--processes", "2", "--nnodes", "2", "--rdzv-endpoint", "bert-leg-3-0.rdzv-bert-leg-3:29400",
    ]  # fmt: skip
    assert container["ports"] == [{"name": "rdzv", "containerPort": 29400, "protocol": "TCP"}]
    assert "suspend" not in spec  # no queue: the Job runs at once
    valid(job)


def test_the_rendezvous_service_is_headless_and_goes_with_its_job() -> None:
    job = created(build_leg_job(leg(nodes=3)))
    service = build_rendezvous_service(job)
    assert service["metadata"]["name"] == "rdzv-bert-leg-3" == job["spec"]["template"]["spec"]["subdomain"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # the pods meet before any is ready
    assert service["spec"]["selector"] == {"job-name": "bert-leg-3"}
    assert service["spec"]["ports"][0]["port"] == 29400
    (owner,) = service["metadata"]["ownerReferences"]
    assert (owner["apiVersion"], owner["kind"], owner["name"], owner["uid"]) == (
        "batch/v1",
        "Job",
        "bert-leg-3",
        "job-uid",
    )
    assert service["metadata"]["labels"]["relay.dev/run"] == "bert"
    valid(service)


def test_kueue_labels_of_the_run_go_onto_the_job_created_suspended() -> None:
    labels = {
        "kueue.x-k8s.io/queue-name": "team-a",
        "kueue.x-k8s.io/priority-class": "high",
        "team": "nlp",  # not Kueue's: not copied
    }
    job = build_leg_job(leg(nodes=2), kueue_labels=labels)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert "team" not in job["metadata"]["labels"]
    assert job["spec"]["suspend"] is True  # Kueue admits the gang as one Workload, then unsuspends it
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    valid(job)
    service = build_rendezvous_service(created(job))
    assert not any(key.startswith("kueue.x-k8s.io/") for key in service["metadata"]["labels"])
    # spec.scheduling.kueueQueue names the queue when set
    queued = build_leg_job(leg(nodes=2, scheduling={"kueueQueue": "spot"}), kueue_labels=labels)
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "spot" and queued["spec"]["suspend"] is True


def test_a_single_node_leg_job_is_unchanged() -> None:
    job = build_leg_job(leg(processes=2))
    assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
    assert "subdomain" not in job["spec"]["template"]["spec"]
    assert "--rdzv-endpoint" not in job["spec"]["template"]["spec"]["containers"][0]["command"]


@pytest.mark.parametrize(("minor", "refused"), [(20, True), (23, True), (24, False), (33, False)])
def test_a_server_without_indexed_jobs_refuses_multi_node_runs(minor: int, refused: bool) -> None:
    features = ServerFeatures(1, minor, "v1")
    reason = multinode_refusal(leg(nodes=2).spec, features)
    if refused:
        assert reason == (
            f"spec.resources.nodes: 2 nodes need an Indexed Job (Kubernetes 1.24+); this API server is v1.{minor}: "
            "use resources.nodes 1, or a newer cluster"
        )
    else:
        assert reason is None
    assert multinode_refusal(leg(processes=2).spec, features) is None  # one node runs everywhere


# ------------------------------------------------------------------ judging a gang (controller.kubernetes.legs)

NOW = 1_800_000_000.0


def at(seconds_ago: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(NOW - seconds_ago, UTC).isoformat().replace("+00:00", "Z")


def indexed_job(nodes: int = 2) -> dict[str, Any]:
    job = created(build_leg_job(leg(nodes=nodes)))
    job["metadata"]["creationTimestamp"] = at(1000)
    return job


def pod(index: int, phase: str, *, started_ago: float | None = None, **status: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"phase": phase, **status}
    if started_ago is not None:
        body["startTime"] = at(started_ago)
    return {
        "metadata": {"name": f"bert-leg-3-{index}-x", "creationTimestamp": at(1000)},
        "spec": {"nodeName": f"node-{index}"},
        "status": body,
    }


def unschedulable(index: int) -> dict[str, Any]:
    condition = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        "lastTransitionTime": at(700),
    }
    return pod(index, "Pending", conditions=[condition])


def exited(index: int, code: int, **meta: Any) -> dict[str, Any]:
    ended = pod(index, "Failed" if code else "Succeeded")
    terminated = {"exitCode": code, "finishedAt": at(5), "reason": "Error" if code else "Completed"}
    ended["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    ended["metadata"].update(meta)
    return ended


def judge(pods: list[dict[str, Any]], vanished: list[dict[str, Any]] | None = None, **kwargs: Any) -> Any:
    from controller.kubernetes.legs import judge_leg

    return judge_leg(indexed_job(), pods, vanished or [], now=NOW, stuck_after_s=900, **kwargs)


def test_a_gang_runs_only_when_every_pod_runs() -> None:
    from controller.leg_model import LegState

    both = judge([pod(0, "Running", started_ago=30), pod(1, "Running", started_ago=29)], rendezvous_timeout_s=600)
    assert both.observation.state == LegState.RUNNING and both.observation.detail == "2 pods running"
    one = judge([pod(0, "Running", started_ago=30), pod(1, "Pending")], rendezvous_timeout_s=600)
    assert one.observation.state == LegState.PENDING and not one.force_delete
    alone = judge([pod(0, "Running", started_ago=30)], rendezvous_timeout_s=600)  # pod 1 not created yet
    assert alone.observation.state == LegState.PENDING and alone.observation.detail == "1 of 2 pods running"


def test_a_rendezvous_that_never_completes_is_stuck_and_its_job_deleted() -> None:
    from controller.leg_model import LegOutcomeKind, LegState, classify_termination

    pods = [pod(0, "Running", started_ago=601), unschedulable(1)]
    verdict = judge(pods, rendezvous_timeout_s=600)
    termination = verdict.observation.termination
    assert verdict.observation.state == LegState.TERMINATED and termination is not None
    assert termination.reason == "RendezvousTimeout" and termination.stuck
    assert classify_termination(termination) == LegOutcomeKind.STUCK  # a failure of the leg, not a preemption
    assert termination.message.startswith(
        "RendezvousTimeout: 1 of 2 pods running for 601s (rendezvousTimeoutSeconds 600)"
    )
    assert "bert-leg-3-1-x Unschedulable: 0/3 nodes are available" in termination.message
    assert verdict.force_delete and verdict.halt and verdict.record  # the Job goes, its running pod with it
    assert judge(pods, rendezvous_timeout_s=602).observation.state == LegState.PENDING  # not yet


def test_a_gang_ends_with_its_most_telling_pod() -> None:
    from controller.leg_model import LegOutcomeKind, classify_termination

    def outcome(*pods: dict[str, Any], vanished: list[dict[str, Any]] | None = None) -> LegOutcomeKind:
        termination = judge(list(pods), vanished).observation.termination
        assert termination is not None
        return classify_termination(termination)

    assert outcome(exited(0, 0), exited(1, 0)) == LegOutcomeKind.COMPLETED
    assert outcome(exited(0, 75), exited(1, 75)) == LegOutcomeKind.PREEMPTED  # SIGTERM to one pod: both saved
    # Node 1 SIGKILLed (its pod vanished without an exit); node 0's rank failed on the broken collective: preempted.
    lost_peer = pod(1, "Running", started_ago=100)
    assert outcome(exited(0, 1), vanished=[lost_peer]) == LegOutcomeKind.PREEMPTED
    assert outcome(exited(0, 1), exited(1, 1)) == LegOutcomeKind.FAILED
    assert outcome(exited(0, 65), exited(1, 1)) == LegOutcomeKind.INVALID
    assert outcome(exited(0, 76), exited(1, 75)) == LegOutcomeKind.SUPERSEDED


def test_a_gang_waits_for_every_pod_to_exit() -> None:
    from controller.leg_model import LegState

    verdict = judge([exited(0, 75), pod(1, "Running", started_ago=100)])
    assert verdict.observation.state == LegState.RUNNING and verdict.halt  # no replacement; wait for pod 1


def test_the_trainers_world_size_note_is_read_from_its_progress_message() -> None:
    from controller.kubernetes.legs import world_size_change

    note = "world size changed 2 -> 1 since checkpoint step 8; 1 process(es), 2 micro-batch(es) of 8 each per step"
    assert world_size_change(f"resumed from checkpoint step 8; {note}") == note
    assert world_size_change("resumed from checkpoint step 8") is None


def test_a_gang_pod_on_a_lost_node_loses_the_leg_even_after_its_peer_ended() -> None:
    from controller.kubernetes.legs import LostLegLimits
    from controller.leg_model import LegOutcomeKind, LegState, classify_termination

    not_ready = {"status": {"conditions": [{"type": "Ready", "status": "Unknown", "lastTransitionTime": at(90)}]}}
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": at(900)}]}}
    # Node 1 went away: pod 1 never reports an exit; rank 0 failed on the broken collective and its pod ended.
    pods = [exited(0, 1), pod(1, "Running", started_ago=300)]
    limits = LostLegLimits(node_lost_after_s=60, nodes={"node-0": ready, "node-1": not_ready})
    verdict = judge(pods, lost=limits)
    termination = verdict.observation.termination
    assert verdict.observation.state == LegState.TERMINATED and termination is not None
    assert termination.reason == "NodeLost" and "node node-1 Ready=Unknown for 90s" in termination.message
    assert classify_termination(termination) == LegOutcomeKind.PREEMPTED and verdict.force_delete
    healthy = LostLegLimits(node_lost_after_s=60, nodes={"node-0": ready, "node-1": ready})
    assert judge(pods, lost=healthy).observation.state == LegState.RUNNING  # waiting for pod 1's exit
