"""Property-based checks of TrainingRun validation: any document validates or is refused naming a field.

Never a traceback, and nothing that validates can name a path outside the volume.
"""

from __future__ import annotations

import copy
import re
from pathlib import PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.spec import VOLUME_PATH_PATTERN, InvalidTrainingRun, TrainingRun, parse_training_run, trainer_config

VALID: dict[str, Any] = {
    "apiVersion": "relay.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "demo", "namespace": "team-a"},
    "spec": {
        "model": "tiny",
        "dataset": {"source": "csv", "path": "data/reviews.csv", "textField": "text", "labelField": "label"},
        "training": {"epochs": 2, "batchSize": 8, "learningRate": 3e-5, "checkpointEverySteps": 20},
        "resources": {"gpus": 1, "cpu": "4", "memory": "16Gi"},
        "retries": {"maxPreemptions": 10, "maxFailures": 2},
    },
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=3)),
    max_leaves=8,
)
# Paths into VALID that a mutation may replace.
PATHS = [
    ("apiVersion",),
    ("kind",),
    ("metadata", "name"),
    ("metadata", "namespace"),
    ("spec", "model"),
    ("spec", "dataset", "source"),
    ("spec", "dataset", "path"),
    ("spec", "dataset", "evalFraction"),
    ("spec", "training", "epochs"),
    ("spec", "training", "batchSize"),
    ("spec", "training", "learningRate"),
    ("spec", "training", "warmupRatio"),
    ("spec", "training", "checkpointEverySteps"),
    ("spec", "resources", "cpu"),
    ("spec", "resources", "gpus"),
    ("spec", "retries", "maxFailures"),
    ("spec", "storage", "claimName"),
    (
        "spec",
        "unknownField",
    ),
    ("spec", "training", "bogus"),
]


def _set(document: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = document
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


def _check(document: Any) -> TrainingRun | None:
    try:
        run = parse_training_run(document, "fuzz.yaml")
    except InvalidTrainingRun as exc:
        assert exc.errors, "a refusal must name at least one field"
        for field, message in exc.errors:
            assert field and message
        assert str(exc).startswith("fuzz.yaml: invalid TrainingRun")
        return None
    path = run.spec.dataset.path
    if path is not None:
        assert not PurePosixPath(path).is_absolute() and ".." not in PurePosixPath(path).parts
    trainer_config(run.spec)  # a valid run always resolves to a valid trainer config
    return run


def test_the_reference_document_is_valid() -> None:
    run = _check(copy.deepcopy(VALID))
    assert run is not None and run.workflow_id == "trainingrun-team-a.demo"
    assert trainer_config(run.spec).torch_threads == 4


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), values), min_size=1, max_size=4))
def test_mutated_documents_validate_or_name_a_field(mutations: list[tuple[tuple[str, ...], Any]]) -> None:
    document = copy.deepcopy(VALID)
    for path, value in mutations:
        _set(document, path, value)
    _check(document)


@settings(max_examples=100, deadline=None)
@given(values)
def test_arbitrary_documents_never_raise_anything_else(document: Any) -> None:
    _check(document)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/etc/passwd", "spec.dataset.path"),
        ("../other-team/data.csv", "spec.dataset.path"),
        ("data/../../escape.csv", "spec.dataset.path"),
        ("~/data.csv", "spec.dataset.path"),
    ],
)
def test_dataset_paths_cannot_escape_the_volume(path: str, field: str) -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["dataset"]["path"] = path
    with pytest.raises(InvalidTrainingRun) as caught:
        parse_training_run(document, "run.yaml")
    assert [f for f, _ in caught.value.errors] == [field]


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda d: d["metadata"].update(name="Bad_Name"), "metadata.name", "DNS label"),
        (lambda d: d["spec"]["training"].update(batchSize=0), "spec.training.batchSize", "greater than or equal to 1"),
        (lambda d: d["spec"]["training"].update(learningRate=-1), "spec.training.learningRate", "greater than 0"),
        (lambda d: d["spec"]["training"].update(epochs="many"), "spec.training.epochs", "valid integer"),
        (lambda d: d["spec"]["dataset"].update(source="ftp"), "spec.dataset.source", "'demo'"),
        (lambda d: d["spec"].update(colour="blue"), "spec.colour", "Extra inputs"),
        (lambda d: d["spec"]["resources"].update(cpu="2Gi"), "spec.resources.cpu", "pattern"),
        (lambda d: d["spec"]["dataset"].pop("path"), "spec.dataset", "path is required"),
    ],
)
def test_each_bad_field_is_named(mutate: Any, field: str, words: str) -> None:
    document = copy.deepcopy(VALID)
    mutate(document)
    with pytest.raises(InvalidTrainingRun) as caught:
        parse_training_run(document, "run.yaml")
    assert any(f == field and words in m for f, m in caught.value.errors), caught.value.errors


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=["a", ".", "/", "~", " ", "\\"], max_size=10))
def test_the_crd_pattern_and_validation_accept_the_same_volume_paths(path: str) -> None:
    """Issue 11 parity: the API server (the CRD's pattern) and `relay validate` agree on every model and
    dataset path, and whatever passes stays inside the volume."""
    for field in ("model", "path"):
        document = copy.deepcopy(VALID)
        if field == "model":
            document["spec"]["model"] = path
        else:
            document["spec"]["dataset"]["path"] = path
        try:
            parse_training_run(document)
            accepted = True
        except InvalidTrainingRun:
            accepted = False
        assert accepted == bool(re.match(VOLUME_PATH_PATTERN, path)), (field, path)
        if accepted:
            assert not PurePosixPath(path).is_absolute() and ".." not in PurePosixPath(path).parts
