"""The Temporal worker: the task queue name, the pydantic data converter and `build_worker`.

The local CLI (`relay run`, `relay worker`) and the Kubernetes operator process both build their
worker here, with their own Backend and StatusSink, so both run exactly the same workflows.
"""

from __future__ import annotations

from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.worker import Worker

from controller.activities import RelayActivities, StatusSink
from controller.backends.base import Backend
from controller.workflows import BertInferenceWorkflow, CheckpointedBertTrainingWorkflow

TASK_QUEUE = "bert-checkpointing-task-queue"
DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"
DATA_CONVERTER: DataConverter = pydantic_data_converter
WORKFLOWS = [CheckpointedBertTrainingWorkflow, BertInferenceWorkflow]


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
    max_concurrent_activities: int = 64,
) -> Worker:
    """A worker running both workflows and all activities; `client` must use DATA_CONVERTER."""
    acts = activities or RelayActivities(backend, volume_root, status_sink)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        activities=acts.all(),
        max_concurrent_activities=max_concurrent_activities,
    )
