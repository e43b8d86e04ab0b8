"""On a Temporal without Relay's search attributes, the operator says so on the TrainingRun and the run goes on.

The session's dev server registers none: the controller's start handler puts a Warning Event
SearchAttributesMissing on the object, naming the attributes and the one-time commands, and starts the
workflow anyway (a suspended run: no pod needed to see it Paused).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from test_k8s_operator import Cluster, controller, phase, run_spec  # noqa: F401 - `controller` is a fixture

pytestmark = pytest.mark.anyio


async def test_missing_search_attributes_are_an_event_and_the_run_still_starts(
    controller: Any,  # noqa: F811 - the fixture imported above
    kube: Any,
    namespace: str,
) -> None:
    cluster = Cluster(kube, namespace)
    name = f"nosa-{uuid.uuid4().hex[:6]}"
    await cluster.apply(name, run_spec(suspend=True))
    await cluster.until(name, phase("Paused"))
    for _ in range(100):
        items = await asyncio.to_thread(
            cluster.core.list_namespaced_event, namespace, field_selector=f"involvedObject.name={name}"
        )
        warned = [e for e in items.items if e.reason == "SearchAttributesMissing"]
        if warned:
            break
        await asyncio.sleep(0.1)
    (event,) = warned
    assert event.type == "Warning"
    assert "RelayPhase missing" in event.message
    assert "temporal operator search-attribute create" in event.message
