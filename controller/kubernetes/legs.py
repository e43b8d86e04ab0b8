"""Read a leg's Job and pods (as the API server reports them) into a LegObservation: pure, no API calls.

This is where Kubernetes facts become `LegTermination` facts; `controller.backends.base.classify_termination`
then decides what they mean. It works from what v1.20 reports (pod deletion, `status.reason` Evicted,
container exit codes and terminated reasons such as OOMKilled, PodScheduled=False/Unschedulable, image
pull waiting reasons) and uses the DisruptionTarget pod condition where a newer cluster sets it (1.26+),
as well as the Job's PodFailurePolicy failure (1.26+, `jobs.POD_FAILURE_POLICY`) when its pods are gone.
A termination's message leads with the trainer's own reason: the container's `terminated.message`, which
the kubelet fills from the trainer's termination-message file.

The verdict also says what the backend must do to the Job: `halt` (parallelism 0, so the 1.20 Job
controller does not start a replacement pod next to a terminating one; it also removes a stuck pod),
`record` (write the termination onto the Job as an annotation, so a restarted controller reads the same facts)
and `force_delete` (a lost leg: delete its pods and Job with grace 0 so the next leg may start).

A multi-node leg (one Indexed Job of M pods, issue 14) is one gang: it runs once every pod runs; it ends when
every pod has ended, its termination the most telling of theirs (`gang_termination`: a fenced or invalid-input
exit, then a checkpointed stop (75), then a pod the infrastructure took away, then a failure: a pod that failed only
because its peer vanished does not make a preempted leg a failed one). A gang whose pods are not all running
`rendezvous_timeout_s` after the first one started never meets (one pod unschedulable, say): it is stuck
(RendezvousTimeout) and its Job deleted, instead of holding the running pods' nodes forever.

A leg is lost (issue 13) while its pod has not ended when its node has been NotReady or Unknown for
retries.nodeLostAfterSeconds (reason NodeLost), its pod's phase is Unknown (NodeLost), or it is Running with
no progress on the volume for retries.progressStallSeconds (ProgressStalled). A partitioned node keeps its pod
"Running" and may keep writing the shared volume: the next leg's fence (trainer.volume.fencing) stops it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from controller.kubernetes.jobs import ANNOTATION_TERMINATION, TRAINER_CONTAINER
from controller.leg_model import LegObservation, LegState, LegTermination
from trainer.volume import ExitCode

# Pod status.reason values a kubelet or node controller sets when the infrastructure took the pod away.
DISRUPTION_REASONS = frozenset({"Evicted", "NodeLost", "Shutdown", "NodeShutdown", "Terminated", "Preempting"})
# Container waiting reasons that do not fix themselves: counted towards "stuck" after the deadline.
MESSAGE_MAX_CHARS = 1000  # of a container's termination message, in a leg's termination message
STUCK_WAITING_REASONS = frozenset(
    {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"}
)
# The Job controller's messages when a podFailurePolicy rule failed the Job (reason PodFailurePolicy), e.g.
# "Container trainer for pod ml/r-leg-0-x failed with exit code 75 matching FailJob rule at index 1" and
# "Pod ml/r-leg-0-x has condition DisruptionTarget matching FailJob rule at index 0".
_RULE_EXIT_CODE = re.compile(r"failed with exit code (\d+) matching")
_RULE_DISRUPTION = "has condition DisruptionTarget matching"


@dataclass(frozen=True)
class LegVerdict:
    observation: LegObservation
    halt: bool = False  # set the Job's parallelism to 0 (no replacement pod; removes a stuck pod)
    record: bool = False  # write observation.termination onto the Job
    force_delete: bool = False  # a lost leg: delete its pods and Job with grace 0 (fencing keeps that safe)


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c.get("type") == type_), None)


def _trainer_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == TRAINER_CONTAINER), statuses[0] if statuses else {})


def recorded_termination(job: dict[str, Any]) -> LegTermination | None:
    raw = (job.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_TERMINATION)
    return LegTermination.model_validate(json.loads(raw)) if raw else None


def job_condition_termination(type_: str, condition: dict[str, Any]) -> LegTermination:
    """The facts of a Job that ended (condition Complete or Failed) when none of its pods is left to read."""
    reason = condition.get("reason") or type_
    message = condition.get("message") or ""
    exit_code = 0 if type_ == "Complete" else None
    disrupted = False
    if reason == "PodFailurePolicy":
        found = _RULE_EXIT_CODE.search(message)
        exit_code = int(found.group(1)) if found else None
        disrupted = _RULE_DISRUPTION in message
    return LegTermination(exit_code=exit_code, reason=reason, message=message, disrupted=disrupted)


def _deleted_before_exit(meta: dict[str, Any], terminated: dict[str, Any] | None) -> bool:
    """Deletion (kubectl delete, the Eviction API, the garbage collector) asked before the trainer exited."""
    deleted_at = parse_time(meta.get("deletionTimestamp"))
    if deleted_at is None:
        return False
    asked_at = deleted_at - float(meta.get("deletionGracePeriodSeconds") or 0)
    finished_at = parse_time((terminated or {}).get("finishedAt"))
    return finished_at is None or finished_at >= asked_at - 1.0


def container_message(terminated: dict[str, Any] | None) -> str:
    """The trainer's reason from `terminated.message`: the line it wrote to its termination-message file, or,
    under FallbackToLogsOnError without one, the last line of the log tail the kubelet put there; or ''."""
    text = str((terminated or {}).get("message") or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:MESSAGE_MAX_CHARS] if lines else ""


def pod_termination(pod: dict[str, Any], vanished: bool = False) -> LegTermination | None:
    """The facts of a pod that has ended (or vanished), or None while it has not."""
    meta, status = pod.get("metadata", {}), pod.get("status", {})
    terminated = (_trainer_status(pod).get("state") or {}).get("terminated")
    phase = status.get("phase")
    target = _condition(pod, "DisruptionTarget")
    disrupted_by = ""
    if target is not None and target.get("status") == "True":
        disrupted_by = target.get("reason") or "DisruptionTarget"
    elif status.get("reason") in DISRUPTION_REASONS:
        disrupted_by = str(status["reason"])
    elif _deleted_before_exit(meta, terminated) or (vanished and terminated is None):
        disrupted_by = "Deleted"
    if terminated is None and phase not in ("Succeeded", "Failed") and not vanished:
        return None
    exit_code = terminated.get("exitCode") if terminated else None
    container_reason = (terminated or {}).get("reason") or ""
    if container_reason in ("Completed", "Error"):
        container_reason = ""
    reason = container_reason or disrupted_by or ("Completed" if exit_code == 0 else f"ExitCode{exit_code}")
    parts = [
        container_message(terminated),  # the trainer's own word first
        f"pod {meta.get('name')}",
        f"exit code {exit_code}" if exit_code is not None else "no exit code",
        status.get("message") or "",  # the node's: eviction, shutdown
        "vanished before reporting an exit" if vanished and terminated is None else "",
    ]
    return LegTermination(
        exit_code=exit_code,
        reason=reason,
        message="; ".join(p for p in parts if p),
        disrupted=bool(disrupted_by),
    )


def _stuck_since(pod: dict[str, Any]) -> tuple[float | None, str]:
    scheduled = _condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        since = parse_time(scheduled.get("lastTransitionTime")) or parse_time(pod["metadata"].get("creationTimestamp"))
        return since, f"Unschedulable: {scheduled.get('message', '')}".strip()
    waiting = (_trainer_status(pod).get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in STUCK_WAITING_REASONS:
        since = parse_time(pod["metadata"].get("creationTimestamp"))
        return since, f"{waiting['reason']}: {waiting.get('message', '')}".strip()
    return None, ""


@dataclass(frozen=True)
class LostLegLimits:
    """What the backend knows beyond the Job and its pods, for the lost-leg checks: the leg pod's Node (None when
    unknown or unreadable) and when the leg's progress last moved (None: not known), with the run's limits."""

    node: dict[str, Any] | None = None
    node_lost_after_s: float = 60.0
    progress_at: float | None = None
    progress_stall_s: float | None = None
    # A multi-node leg's: the Node of each of its started pods by name (each pod is checked against its own).
    nodes: dict[str, dict[str, Any] | None] = field(default_factory=dict)


def lost_leg(pod: dict[str, Any], limits: LostLegLimits, now: float) -> LegTermination | None:
    """The facts of a leg whose pod has not ended but which is lost (node gone, phase Unknown, no progress)."""
    name = pod["metadata"]["name"]
    node_name = pod.get("spec", {}).get("nodeName") or ""
    phase = pod.get("status", {}).get("phase")
    ready = _condition(limits.node, "Ready") if limits.node is not None else None
    if ready is not None and ready.get("status") in ("False", "Unknown"):
        since = parse_time(ready.get("lastTransitionTime"))
        if since is not None and now - since >= limits.node_lost_after_s:
            message = (
                f"NodeLost: node {node_name} Ready={ready.get('status')} for {now - since:.0f}s "
                f"(nodeLostAfterSeconds {limits.node_lost_after_s:g}); pod {name} still reported {phase}"
            )
            return LegTermination(reason="NodeLost", message=message, disrupted=True)
    if phase == "Unknown":
        message = f"NodeLost: pod {name} phase Unknown (node {node_name} not reporting)"
        return LegTermination(reason="NodeLost", message=message, disrupted=True)
    if phase == "Running" and limits.progress_stall_s is not None and limits.progress_at is not None:
        silent = now - limits.progress_at
        if silent >= limits.progress_stall_s:
            message = (
                f"ProgressStalled: pod {name} Running on {node_name} with no progress for {silent:.0f}s "
                f"(progressStallSeconds {limits.progress_stall_s:g})"
            )
            return LegTermination(reason="ProgressStalled", message=message, disrupted=True)
    return None


def gang_size(job: dict[str, Any]) -> int:
    """The pods a leg's Job runs at once: M for a multi-node leg's Indexed Job, else 1."""
    spec = job.get("spec") or {}
    return int(spec.get("completions") or 1) if spec.get("completionMode") == "Indexed" else 1


def _gang_rank(termination: LegTermination) -> int:
    code = termination.exit_code
    order = {int(ExitCode.FENCED): 0, int(ExitCode.INVALID_INPUT): 1, int(ExitCode.PREEMPTED): 2}
    if code is not None and code in order:
        return order[code]
    if termination.disrupted:
        return 3
    if code not in (None, 0):
        return 4
    return 5 if code == 0 else 6


def gang_termination(ended: list[LegTermination]) -> LegTermination:
    """The leg's termination from its pods' (see the module docstring); all exited 0: the first, completed."""
    return min(ended, key=_gang_rank)


def rendezvous_stuck(pods: list[dict[str, Any]], size: int, now: float, timeout_s: float) -> LegTermination | None:
    """A gang of `size` pods whose pods are not all Running `timeout_s` after the first one started, or None."""
    running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
    if not running or len(running) >= size:
        return None
    started = [parse_time(p.get("status", {}).get("startTime")) for p in running]
    since = min((t for t in started if t is not None), default=None)
    if since is None or now - since < timeout_s:
        return None
    waiting = sorted(p["metadata"]["name"] for p in pods if p not in running)
    why = "; ".join(f"{name} {_pod_state(p)}" for name, p in zip(waiting, _by_name(pods, waiting), strict=True))
    message = (
        f"RendezvousTimeout: {len(running)} of {size} pods running for {now - since:.0f}s "
        f"(rendezvousTimeoutSeconds {timeout_s:g}); not running: {why or 'not created'}"
    )
    return LegTermination(reason="RendezvousTimeout", message=message, stuck=True)


def _by_name(pods: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    index = {p["metadata"]["name"]: p for p in pods}
    return [index[name] for name in names]


def _pod_state(pod: dict[str, Any]) -> str:
    _, why = _stuck_since(pod)
    return why or str(pod.get("status", {}).get("phase") or "Pending")


def judge_leg(
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    vanished: list[dict[str, Any]],
    *,
    now: float,
    stuck_after_s: float,
    lost: LostLegLimits | None = None,
    rendezvous_timeout_s: float | None = None,
) -> LegVerdict:
    """What a leg's Job and pods say. `pods` are the live pods of the Job, `vanished` the ones seen deleted
    before they reported an exit. The leg's pod is the Job's first; later ones are replacements. `lost`
    enables the lost-leg checks (lost_leg) on the leg's live pod. A multi-node leg's Indexed Job is judged as a
    gang (module docstring), stuck at its rendezvous after `rendezvous_timeout_s` when given."""
    if job is None:
        return LegVerdict(LegObservation(state=LegState.MISSING, detail="no Job"))
    recorded = recorded_termination(job)
    if recorded is not None:
        return LegVerdict(LegObservation(state=LegState.TERMINATED, termination=recorded, detail="ended"))
    by_age = sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
    if not by_age and not vanished:
        for type_ in ("Complete", "Failed"):
            cond = _condition(job, type_)
            if cond is not None and cond.get("status") == "True":
                termination = job_condition_termination(type_, cond)
                return LegVerdict(LegObservation(state=LegState.TERMINATED, termination=termination), record=True)
        return LegVerdict(LegObservation(state=LegState.PENDING, detail="waiting for the Job's pod"))
    ended: list[LegTermination] = []
    live: list[dict[str, Any]] = []
    for pod in by_age:
        ending = pod_termination(pod)
        if ending is None:
            live.append(pod)
        else:
            ended.append(ending)
    ended.extend(t for t in (pod_termination(p, vanished=True) for p in vanished) if t is not None)
    size = gang_size(job)
    if ended and not live:
        # The trainer's own exit is the most telling fact; a pod that vanished without one comes after.
        termination = next((t for t in ended if t.exit_code is not None), ended[0])
        if size > 1:
            termination = gang_termination(ended)
        return LegVerdict(
            LegObservation(state=LegState.TERMINATED, termination=termination, detail="the leg's pods ended"),
            halt=True,
            record=True,
        )
    pod = live[0]
    name = pod["metadata"]["name"]
    gone = lost_leg(pod, lost, now) if lost is not None and not ended else None
    if lost is not None and size > 1 and gone is None:
        # A gang: any pod on a lost node loses the leg, even once its peers ended (they fail on the broken
        # collective, while the lost pod never reports an exit and would keep the leg waiting for ever).
        for member in live:
            node = lost.nodes.get(member.get("spec", {}).get("nodeName") or "")
            gone = lost_leg(member, replace(lost, node=node), now)
            if gone is not None:
                pod, name = member, member["metadata"]["name"]
                break
    if gone is not None:
        detail = f"pod {name} lost: {gone.reason}"
        observation = LegObservation(state=LegState.TERMINATED, termination=gone, detail=detail)
        return LegVerdict(observation, halt=True, record=True, force_delete=True)
    if ended or any(p["metadata"].get("deletionTimestamp") for p in live):
        # A pod is going away (deleted, evicted) or went: on 1.20 the Job controller starts a replacement at
        # once; halt the Job and wait until every pod of the leg has exited before calling the leg over.
        return LegVerdict(
            LegObservation(state=LegState.RUNNING, detail=f"pod {name} terminating, waiting for the leg's exit"),
            halt=True,
        )
    if size > 1 and rendezvous_timeout_s is not None:
        stuck = rendezvous_stuck(live, size, now, rendezvous_timeout_s)
        if stuck is not None:
            observation = LegObservation(state=LegState.TERMINATED, termination=stuck, detail="rendezvous timed out")
            return LegVerdict(observation, halt=True, record=True, force_delete=True)
    if size > 1:
        running = sum(1 for p in live if p.get("status", {}).get("phase") == "Running")
        if running == size == len(live):
            return LegVerdict(LegObservation(state=LegState.RUNNING, detail=f"{size} pods running"))
        pending = [p for p in live if p.get("status", {}).get("phase") != "Running"]
        pod = pending[0] if pending else pod  # the stuck checks below look at a pod that does not run
        name = pod["metadata"]["name"]
    phase = pod.get("status", {}).get("phase") or "Pending"
    if phase == "Running" and size > 1:
        return LegVerdict(LegObservation(state=LegState.PENDING, detail=f"{running} of {size} pods running"))
    if phase == "Running":
        node = pod.get("spec", {}).get("nodeName", "")
        return LegVerdict(LegObservation(state=LegState.RUNNING, detail=f"pod {name} running on {node}"))
    since, why = _stuck_since(pod)
    if since is not None and now - since >= stuck_after_s:
        termination = LegTermination(
            reason=why.split(":")[0],
            message=f"pod {name} did not start within {stuck_after_s:.0f}s: {why}",
            stuck=True,
        )
        return LegVerdict(LegObservation(state=LegState.TERMINATED, termination=termination), halt=True, record=True)
    return LegVerdict(LegObservation(state=LegState.PENDING, detail=f"pod {name} {phase}{': ' + why if why else ''}"))


def job_alive(job: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
    """A leg that may still write to the run's folder: not recorded as ended, or with a pod not yet finished."""
    if any(p.get("status", {}).get("phase") not in ("Succeeded", "Failed") for p in pods):
        return True
    if recorded_termination(job) is not None:
        return False
    return (
        not any(
            (c.get("type") in ("Complete", "Failed") and c.get("status") == "True")
            for c in job.get("status", {}).get("conditions") or []
        )
        and job.get("spec", {}).get("parallelism") != 0
    )


WORLD_SIZE_CHANGED = "world size changed"  # trainer.train's words in progress.json's message (and the leg log)


def world_size_change(message: str) -> str | None:
    """The trainer's note that a leg resumed on another world size ("world size changed 2 -> 1 since checkpoint
    step 8; 1 process(es), 2 micro-batch(es) of 8 each per step: global batch 16 kept"), from its progress
    message, or None."""
    at = message.find(WORLD_SIZE_CHANGED)
    return message[at:].strip() if at >= 0 else None
