"""A TrainingSweep through the whole controller on envtest: `run_controller` (kopf + Temporal worker, as `relay
controller` runs them) creates the trials as TrainingRuns the sweep owns, runs them with the real trainer through
the process kubelet, prunes and promotes them by ASHA, and fills the sweep's status, columns and Events.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException
from test_k8s_operator import assert_controller_alive
from test_k8s_operator import controller as controller  # the operator fixture, shared
from test_k8s_real_trainer import kubectl, real_kubelet, write_reviews
from test_sweep_crd import sweep_crd as sweep_crd  # the TrainingSweep CRD, installed before the controller starts

from relay_testing.process_kubelet import ProcessKubelet
from trainer.faults import STEP_SLEEP_ENV

pytestmark = [pytest.mark.cluster, pytest.mark.anyio, pytest.mark.slow]
_ = real_kubelet  # a fixture, used by name
GROUP, VERSION = "relay.dev", "v1alpha1"


@pytest.fixture(autouse=True)
def quick_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials' eval lines read every 0.5 s, not 5 s: a rung is seen at once (the handler reads it per sweep)."""
    monkeypatch.setattr("controller.sweep.operator.WATCH_POLL_S", 0.5)


def sweep_body(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingSweep",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "model": "tiny",
                "dataset": {"source": "csv", "path": f"data/{namespace}/reviews.csv", "evalFraction": 0.25},
                "training": {
                    "batchSize": 8,
                    "maxSeqLength": 16,
                    "checkpointEverySteps": 4,
                    "evalEverySteps": 4,
                    "logEverySteps": 1,
                    "seed": 11,
                },
                "resources": {"cpu": "1", "memory": "1Gi", "gpus": 1},
                "terminationGracePeriodSeconds": 10,
                "retries": {"backoffSeconds": 0.5},
            },
            "searchSpace": {"learningRate": {"type": "choice", "values": [0.003, 0.0003, 0.00001]}},
            "algorithm": "grid",
            "maxConcurrentTrials": 2,
            "objective": {"metric": "eval_loss", "goal": "minimize"},
            "asha": {"minSteps": 4, "maxSteps": 8, "reductionFactor": 2},
        },
    }


async def test_a_sweep_runs_to_its_best_trial_through_the_controller_and_deleting_it_removes_its_trials(
    sweep_crd: None,
    controller: Any,
    control_plane: Any,
    kube: Any,
    namespace: str,
    real_kubelet: ProcessKubelet,
    volume_root: Path,
) -> None:
    custom: Any = kubernetes.client.CustomObjectsApi(kube)
    core = kubernetes.client.CoreV1Api(kube)
    name = f"sw-{uuid.uuid4().hex[:5]}"
    write_reviews(volume_root / f"data/{namespace}/reviews.csv")
    # Steps slowed, so the pause at a rung (eval line read, spec.suspend patched, the leg stopped) lands before the
    # leg's end even on a loaded machine; the real_kubelet fixture restores its env afterwards.
    real_kubelet.extra_env[STEP_SLEEP_ENV] = "0.5"
    seen: dict[str, dict[str, Any]] = {}  # every trial TrainingRun ever listed, by name

    def trials() -> list[dict[str, Any]]:
        found = custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, "trainingruns", label_selector=f"relay.dev/sweep={name}"
        )
        for run in found["items"]:
            seen[run["metadata"]["name"]] = run
        return list(found["items"])

    def sweep() -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, "trainingsweeps", name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    async def until(what: str, check: Any, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            assert_controller_alive()
            await asyncio.to_thread(trials)
            value = await asyncio.to_thread(check)
            if value:
                return value
            if time.monotonic() > deadline:
                status = ((await asyncio.to_thread(sweep)) or {}).get("status", {})
                runs = {n: {k: r.get("status", {}).get(k) for k in ("phase", "step", "legs", "message")} | {
                    "suspend": r["spec"].get("suspend")} for n, r in seen.items()}  # fmt: skip
                raise AssertionError(f"timed out waiting for {what}; sweep status: {status}; trials: {runs}")
            await asyncio.sleep(0.3)

    created = await asyncio.to_thread(
        custom.create_namespaced_custom_object, GROUP, VERSION, namespace, "trainingsweeps", sweep_body(name, namespace)
    )
    done = await until(
        "the sweep Succeeded", lambda: (sweep() or {}).get("status", {}).get("phase") == "Succeeded", 150
    )
    status = (await asyncio.to_thread(sweep) or {})["status"]

    # Every trial was a TrainingRun the sweep owns; the pruned ones were deleted, the completed ones stay.
    assert done and sorted(seen) == [f"{name}-t000", f"{name}-t001", f"{name}-t002"], sorted(seen)
    for run in seen.values():
        (owner,) = run["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("TrainingSweep", created["metadata"]["uid"])
    states = {t["name"]: t["state"] for t in status["trials"]}
    completed = sorted(n for n, s in states.items() if s == "completed")
    pruned = sorted(n for n, s in states.items() if s == "pruned")
    assert completed and pruned and len(completed) + len(pruned) == 3, states
    left = {r["metadata"]["name"]: r for r in await asyncio.to_thread(trials)}
    assert sorted(left) == completed, "a pruned trial's TrainingRun is deleted, a completed one kept"
    # A promoted trial resumed from the checkpoint its paused leg left at the rung (or a step or two later), not at 0.
    for trial_name in completed:
        run_status = left[trial_name]["status"]
        assert run_status["phase"] == "Succeeded" and run_status["step"] == 8, run_status
        promoted = next(t for t in status["trials"] if t["name"] == trial_name)
        first, second = run_status["legs"]
        assert promoted["resumes"] == 1 and first["startStep"] == 0 and first["outcome"] != "completed", run_status
        assert 4 <= second["startStep"] < 8 and second["startStep"] == first["endStep"], run_status
    best = status["best"]
    assert best["name"] in completed and best["step"] == 8 and best["metric"] == "eval_loss"
    assert (volume_root / best["modelPath"]).is_dir(), best
    assert (status["trialCount"], status["running"], status["pruned"]) == (3, 0, len(pruned))

    listing = await asyncio.to_thread(
        subprocess.run,
        [kubectl(), "--kubeconfig", str(control_plane.kubeconfig), "-n", namespace, "get", "trainingsweeps"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "TRIALS", "RUNNING", "PRUNED", "BEST", "AGE"], header
    assert row.split()[:5] == [name, "Succeeded", "3", "0", str(len(pruned))], row
    assert status["bestText"].startswith(best["name"]) and status["bestText"] in row, row

    events = await asyncio.to_thread(
        core.list_namespaced_event, namespace, field_selector=f"involvedObject.name={name}"
    )
    reasons = {e.reason for e in events.items if e.involved_object.kind == "TrainingSweep"}
    assert {"TrialsStarted", "TrialPromoted", "TrialsPruned", "BestTrial", "Succeeded"} <= reasons, reasons

    await asyncio.to_thread(custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, "trainingsweeps", name)
    await until("the sweep and its trials gone", lambda: sweep() is None and not trials(), 60)
