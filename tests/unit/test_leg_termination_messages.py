"""A Kubernetes leg's termination message leads with the trainer's own reason (`terminated.message`), whether the
trainer wrote it to its termination-message file or the kubelet took the log's tail (FallbackToLogsOnError)."""

from __future__ import annotations

from typing import Any

from controller.kubernetes.legs import judge_leg
from controller.leg_model import LegOutcomeKind, classify_termination

JOB: dict[str, Any] = {"metadata": {"name": "r-leg-3", "annotations": {}}, "spec": {"parallelism": 1}, "status": {}}


def ended_pod(terminated: dict[str, Any], **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "r-leg-3-abcde", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {},
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}],
            **status,
        },
    }


def message_of(pod: dict[str, Any]) -> tuple[str, LegOutcomeKind]:
    termination = judge_leg(JOB, [pod], [], now=0, stuck_after_s=60).observation.termination
    assert termination is not None
    return termination.message, classify_termination(termination)


def test_the_trainers_termination_message_leads() -> None:
    pod = ended_pod(
        {"exitCode": 1, "reason": "Error", "message": "OSError: [Errno 28] No space left on device: '/v/ckpt'\n"}
    )
    assert message_of(pod) == (
        "OSError: [Errno 28] No space left on device: '/v/ckpt'; pod r-leg-3-abcde; exit code 1",
        LegOutcomeKind.FAILED,
    )


def test_a_log_tail_gives_its_last_line() -> None:
    """FallbackToLogsOnError without a termination message: the kubelet reports the log's tail."""
    tail = (
        "2026-01-01T00:00:01Z ERROR failed: ValueError: bad schedule\n"
        "Traceback (most recent call last):\n"
        '  File "/app/trainer/train.py", line 321, in _run\n'
        "    scheduler = build(steps)\n"
        "ValueError: bad schedule\n\n"
    )
    message, outcome = message_of(ended_pod({"exitCode": 1, "reason": "Error", "message": tail}))
    assert message == "ValueError: bad schedule; pod r-leg-3-abcde; exit code 1" and outcome == LegOutcomeKind.FAILED


def test_the_nodes_message_and_the_trainers_are_both_kept() -> None:
    evicted = ended_pod(
        {"exitCode": 1, "reason": "Error", "message": "RuntimeError: DataLoader worker (pid 41) is killed"},
        reason="Evicted",
        message="The node was low on resource: memory.",
    )
    message, outcome = message_of(evicted)
    assert (
        message == "RuntimeError: DataLoader worker (pid 41) is killed; pod r-leg-3-abcde; exit code 1; "
        "The node was low on resource: memory."
    )
    assert outcome == LegOutcomeKind.PREEMPTED  # the eviction caused it: not the run's fault


def test_without_any_message_the_pod_and_exit_code_remain() -> None:
    assert message_of(ended_pod({"exitCode": 1, "reason": "Error"})) == (
        "pod r-leg-3-abcde; exit code 1",
        LegOutcomeKind.FAILED,
    )


def test_a_long_message_is_cut() -> None:
    message, _ = message_of(ended_pod({"exitCode": 1, "reason": "Error", "message": "RuntimeError: " + "x" * 5000}))
    assert message.startswith("RuntimeError: xxx") and len(message) < 1100
