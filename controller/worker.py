"""The Temporal worker: the task queue names, the pydantic data converter and `build_worker`.

The local CLI (`relay run`, `relay worker`) and the Kubernetes operator process both build their
worker here, with their own Backend and StatusSink, so both run exactly the same workflows.
Training runs are started on TASK_QUEUE and predictions on INFERENCE_TASK_QUEUE, so each queue's
capacity is its own (a worker's activity slots are shared by what its queue carries): `build_workers`
gives one worker per distinct queue, each able to run either workflow.
"""

from __future__ import annotations

from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.worker import PollerBehaviorAutoscaling, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from controller.activities import RelayActivities, StatusSink
from controller.backends.base import Backend
from controller.sweep.activities import SweepActivities
from controller.sweep.workflow import TrainingSweepWorkflow
from controller.workflows import BertInferenceWorkflow, CheckpointedBertTrainingWorkflow

TASK_QUEUE = "bert-checkpointing-task-queue"
INFERENCE_TASK_QUEUE = "bert-inference-task-queue"
DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"
DATA_CONVERTER: DataConverter = pydantic_data_converter
WORKFLOWS = [CheckpointedBertTrainingWorkflow, BertInferenceWorkflow, TrainingSweepWorkflow]
# Every running leg holds an activity slot (its await_leg, renewed each status window) while it runs, so the
# slots bound how many runs one worker watches at once: past the bound, watches and the launches of new legs
# queue for a slot (64 slots held back a 100-run controller). A slot is a coroutine, blocking work runs in
# threads, so a generous bound costs nothing while idle.
MAX_CONCURRENT_ACTIVITIES = 1000
# Temporal's default sandbox: every workflow run imports the workflow modules afresh and runs them with
# non-deterministic calls (clock, randomness, I/O) refused, in production as in tests/workflow. A run pays for
# re-importing controller.workflows and controller.decisions alone; the pydantic models and enums come from
# modules they pass through (controller.messages, spec, status, backends.base), loaded once per process.
# bench/bench_sandbox.py, against passing controller.workflows through (medians of 3, machine under load 3-9):
# +63 KB RSS per run with 100 runs at once, +95 KB with 300, and +8 ms of CPU per run start; start latency
# unchanged. So 30-46 MB at 500 cached runs (the controller's VmHWM at 500 was 464 MB). Importing the two
# modules allocates ~108 KB (tracemalloc: workflows 72, decisions 36). With the models still defined in the
# workflow module it was +204 KB per run (~100 MB at 500).
WORKFLOW_RUNNER = SandboxedWorkflowRunner()


async def connect(address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE) -> Client:
    """A client with Relay's data converter (pydantic models in and out of everything)."""
    return await Client.connect(address, namespace=namespace, data_converter=DATA_CONVERTER)


def build_worker(
    client: Client,
    backend: Backend,
    volume_root: Path | str,
    status_sink: StatusSink | None = None,
    task_queue: str = TASK_QUEUE,
    *,
    activities: RelayActivities | None = None,
    max_concurrent_activities: int = MAX_CONCURRENT_ACTIVITIES,
    sweep_activities: SweepActivities | None = None,
) -> Worker:
    """A worker running both workflows and all activities; `client` must use DATA_CONVERTER."""
    acts = activities or RelayActivities(backend, volume_root, status_sink)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        # A sweep's trials: workflows this client starts (local), or TrainingRuns (controller.sweep.kubernetes).
        activities=[*acts.all(), *(sweep_activities or SweepActivities(client, volume_root)).all()],
        max_concurrent_activities=max_concurrent_activities,
        workflow_runner=WORKFLOW_RUNNER,
        # Pollers follow the backlog: with a fixed 5, a workflow task of one of 300 runs waited 2 s (median).
        workflow_task_poller_behavior=PollerBehaviorAutoscaling(),
        activity_task_poller_behavior=PollerBehaviorAutoscaling(),
    )


def build_workers(
    client: Client,
    backend: Backend,
    volume_root: Path | str,
    status_sink: StatusSink | None,
    task_queues: list[str],
    *,
    max_concurrent_activities: int = MAX_CONCURRENT_ACTIVITIES,
    sweep_activities: SweepActivities | None = None,
) -> list[Worker]:
    """One worker per distinct queue (training, inference), sharing one set of activities and one backend."""
    acts = RelayActivities(backend, volume_root, status_sink)
    return [
        build_worker(
            client,
            backend,
            volume_root,
            task_queue=queue,
            activities=acts,
            max_concurrent_activities=max_concurrent_activities,
            sweep_activities=sweep_activities,
        )
        for queue in dict.fromkeys(task_queues)
    ]
