"""The evaluation settings (issue 15) on the cluster: the API server refuses what the CRD schema can say (an
unknown metricForBest, evalEverySteps 0), naming the field; the rule across fields that a v1.20 schema cannot
say (metricForBest needs evalEverySteps) is the operator's check_beyond_schema, which names the field too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes
import pytest
from conftest import make_training_run

from controller.kubernetes.handlers import check_beyond_schema


def _spec(training: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "tiny",
        "dataset": {"source": "demo", "maxRows": 100},
        "training": {"maxSteps": 10, "checkpointEverySteps": 5, **training},
    }


@pytest.mark.parametrize(
    ("training", "field", "words"),
    [
        ({"evalEverySteps": 5, "metricForBest": "bleu"}, "spec.training.metricForBest", "Unsupported value"),
        ({"evalEverySteps": 0}, "spec.training.evalEverySteps", "greater than or equal to 1"),
        ({"evalEverySteps": 5, "earlyStoppingPatience": 0}, "spec.training.earlyStoppingPatience", "greater than"),
    ],
)
def test_the_api_server_refuses_bad_evaluation_settings_naming_the_field(
    kube: kubernetes.client.ApiClient,
    crd_installed: Any,
    namespace: str,
    training: dict[str, Any],
    field: str,
    words: str,
) -> None:
    with pytest.raises(kubernetes.client.ApiException) as raised:
        make_training_run(kube, namespace, "bad-eval", _spec(training))
    assert raised.value.status == 422
    assert field in raised.value.body and words in raised.value.body


def test_the_operator_refuses_a_metric_without_evaluations_naming_the_field(tmp_path: Path) -> None:
    document = {
        "apiVersion": "relay.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "no-evals", "namespace": "ml"},
        "spec": _spec({"metricForBest": "accuracy", "loadBestAtEnd": True}),
    }
    # Refused by the parse, before any API call (no client is needed).
    errors = check_beyond_schema(document, tmp_path, core=None)  # type: ignore[arg-type]
    assert any(line.startswith("spec.training.metricForBest: needs evalEverySteps") for line in errors), errors
