"""TrainingRun validation: every bad field is named, with a message a user can act on."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from controller.spec import (
    InvalidTrainingRun,
    cpu_threads,
    load_training_run,
    parse_training_run,
    trainer_config,
    workflow_id,
)

GOOD: dict[str, Any] = {
    "apiVersion": "relay.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "sentiment", "namespace": "ml"},
    "spec": {
        "model": "tiny",
        "dataset": {"source": "csv", "path": "data/reviews.csv"},
        "training": {"maxSteps": 100, "batchSize": 8},
        "resources": {"cpu": "3500m"},
    },
}


def _with(path: str, value: Any) -> dict[str, Any]:
    document = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = document
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return document


def _errors(document: Any) -> dict[str, str]:
    with pytest.raises(InvalidTrainingRun) as info:
        parse_training_run(document, "run.yaml")
    assert str(info.value).startswith("run.yaml: invalid TrainingRun")
    return dict(info.value.errors)


def test_a_good_document_resolves_the_trainer_config():
    run = parse_training_run(GOOD)
    assert run.workflow_id == "trainingrun-ml.sentiment" == workflow_id("ml", "sentiment")
    config = trainer_config(run.spec)
    assert (config.max_steps, config.batch_size, config.torch_threads, config.model) == (100, 8, 3, "tiny")


@pytest.mark.parametrize(
    ("path", "value", "field", "fragment"),
    [
        ("spec.trainingg", {}, "spec.trainingg", "Extra inputs are not permitted"),
        ("spec.training.learningRat", 0.1, "spec.training.learningRat", "Extra inputs are not permitted"),
        ("spec.training.batchSize", "eight", "spec.training.batchSize", "valid integer"),
        ("spec.training.epochs", 0, "spec.training.epochs", "greater than or equal to 1"),
        ("spec.training.learningRate", -0.001, "spec.training.learningRate", "greater than 0"),
        ("spec.training.maxSteps", 0, "spec.training.maxSteps", "greater than or equal to 1"),
        ("spec.retries.maxFailures", -1, "spec.retries.maxFailures", "greater than or equal to 0"),
        ("spec.terminationGracePeriodSeconds", 0, "spec.terminationGracePeriodSeconds", "greater than or equal to 5"),
        ("spec.dataset.source", "ftp", "spec.dataset.source", "'demo', 'csv', 'jsonl', 'parquet' or 'hub'"),
        ("spec.dataset.path", "../../etc/passwd", "spec.dataset.path", "must not contain '..'"),
        ("spec.dataset.path", "/etc/passwd", "spec.dataset.path", "relative to the volume root"),
        ("spec.dataset.evalFraction", 1.0, "spec.dataset.evalFraction", "less than 1"),
        ("metadata.name", "Sentiment_Run", "metadata.name", "must be a DNS label"),
        ("metadata.name", "-run", "metadata.name", "must be a DNS label"),
        ("metadata.name", "a" * 41, "metadata.name", "at most 40"),
        ("metadata.namespace", "ML", "metadata.namespace", "must be a DNS label"),
        ("spec.resources.cpu", "two", "spec.resources.cpu", "should match pattern"),
        ("spec.resources.cpu", "600", "spec.resources.cpu", "more than 512 cores"),
        ("spec.resources.memory", "5Ti", "spec.resources.memory", "more than 4Ti"),
        ("spec.model", "/etc", "spec.model", "a path inside the volume"),
        ("spec.model", "../../../etc", "spec.model", "must not contain '..'"),
        ("spec.retries.stuckAfterSeconds", 1e300, "spec.retries.stuckAfterSeconds", "less than or equal to 604800"),
        ("metadata.name", "a" * 300, "metadata.name", "too long: 300 characters"),
        (
            "spec.scheduling.tolerations",
            [{"key": "k", "tolerationSeconds": -1}],
            "spec.scheduling.tolerations.0.tolerationSeconds",
            "greater than or equal to 0",
        ),
        ("spec.storage.claimName", "Shared_Volume", "spec.storage.claimName", "must be a DNS label"),
        ("spec.training.evalEverySteps", 0, "spec.training.evalEverySteps", "greater than or equal to 1"),
        ("spec.training.metricForBest", "bleu", "spec.training.metricForBest", "'eval_loss', 'accuracy' or 'f1_macro'"),
        ("spec.training.metricForBest", "accuracy", "spec.training.metricForBest", "needs evalEverySteps"),
        ("spec.training.earlyStoppingPatience", 2, "spec.training.earlyStoppingPatience", "needs metricForBest"),
        ("spec.training.loadBestAtEnd", True, "spec.training.loadBestAtEnd", "needs metricForBest"),
        ("spec.training.earlyStoppingPatience", 0, "spec.training.earlyStoppingPatience", "greater than or equal to 1"),
        ("spec.training.checkpointDirectWrites", "sometimes", "spec.training.checkpointDirectWrites", "valid boolean"),
    ],
)
def test_each_bad_field_is_named(path: str, value: Any, field: str, fragment: str):
    errors = _errors(_with(path, value))
    assert field in errors, errors
    assert fragment in errors[field]


def test_every_bad_field_is_reported_at_once():
    document = _with("spec.training.batchSize", 0)
    document["metadata"]["name"] = "Bad Name"
    document["spec"]["dataset"]["source"] = "s3"
    assert {"spec.training.batchSize", "metadata.name", "spec.dataset.source"} <= set(_errors(document))


def test_source_specific_requirements():
    assert "path is required" in _errors(_with("spec.dataset", {"source": "csv"}))["spec.dataset"]
    assert "name is required" in _errors(_with("spec.dataset", {"source": "hub"}))["spec.dataset"]


@pytest.mark.parametrize(
    ("document", "field"),
    [(["a", "list"], "(document)"), ("text", "(document)"), (_with("kind", "Job"), "kind")],
)
def test_not_a_training_run(document: Any, field: str):
    assert field in _errors(document)


def test_files_that_cannot_be_read(tmp_path: Path):
    with pytest.raises(InvalidTrainingRun, match="No such file"):
        load_training_run(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(InvalidTrainingRun, match="not valid YAML"):
        load_training_run(str(broken))


@pytest.mark.parametrize(("cpu", "threads"), [("500m", 1), ("1", 1), ("2", 2), ("3500m", 3), ("16", 16)])
def test_cpu_request_pins_whole_threads(cpu: str, threads: int):
    assert cpu_threads(cpu) == threads


def test_evaluation_settings_reach_the_trainer_config():
    document = _with("spec.training.evalEverySteps", 20)
    document["spec"]["training"] |= {"metricForBest": "eval_loss", "loadBestAtEnd": True, "earlyStoppingPatience": 3}
    config = trainer_config(parse_training_run(document).spec)
    assert (config.eval_every_steps, config.metric_for_best, config.early_stopping_patience) == (20, "eval_loss", 3)
    assert config.load_best_at_end and not config.higher_is_better  # a loss: lower is better unless said
    document["spec"]["training"]["metricForBest"] = "f1_macro"
    assert trainer_config(parse_training_run(document).spec).higher_is_better
