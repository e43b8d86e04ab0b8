"""Attack tier, issue 11 "Validation gaps": `relay validate`, the CRD schema and the run refuse the same documents,
each with one message naming the field.

Findings (reproduced on the code before this change):
- `model: ../../../etc` and `model: /etc` passed `relay validate`;
- `cpu: "999999999999"`, `memory: 99999999999999Ti` and `stuckAfterSeconds: 1e300` passed;
- `cpu: "600"` passed `relay validate` and the API server, then failed at run time with a raw pydantic dump
  (the trainer config pins at most 512 threads);
- a 300-character name was told "must be a DNS label" instead of "too long".

The CRD side is checked with JSON Schema draft 4, whose numeric bounds are OpenAPI 3.0's; where a structural
schema cannot state a bound on Kubernetes 1.20 (a quantity's value, metadata.name's length), the run's create
handler refuses it, naming the field, from the same models.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from controller.cli import run_command
from controller.crd import crd_manifest
from controller.kubernetes.handlers import check_beyond_schema
from controller.spec import InvalidTrainingRun, parse_training_run

GOOD: dict[str, Any] = {
    "apiVersion": "relay.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "sentiment", "namespace": "ml"},
    "spec": {"model": "tiny", "dataset": {"source": "demo"}, "resources": {"cpu": "2", "memory": "8Gi"}},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    document = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = document
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return document


def _nullable_as_draft4(node: Any) -> Any:
    """OpenAPI's `nullable: true` in JSON Schema draft 4 terms (a type list with "null")."""
    if isinstance(node, list):
        return [_nullable_as_draft4(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable_as_draft4(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    return out


SPEC_SCHEMA = _nullable_as_draft4(
    crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
)


def crd_refuses(spec: dict[str, Any]) -> list[str]:
    """Field paths the CRD's spec schema refuses, as the API server would name them."""
    validator = jsonschema.Draft4Validator(SPEC_SCHEMA)
    return sorted(".".join(["spec", *map(str, error.absolute_path)]) for error in validator.iter_errors(spec))


class NoClaimCheck:
    """The one API call check_beyond_schema makes: the claim exists."""

    def read_namespaced_persistent_volume_claim(self, name: str, namespace: str) -> object:
        return object()


def run_refuses(document: dict[str, Any], tmp_path: Path) -> list[str]:
    """The create handler's `field: message` lines (a Failed condition naming the field when not empty)."""
    return check_beyond_schema(document, tmp_path, NoClaimCheck())  # type: ignore[arg-type]


ATTACKS = [
    ("spec.model", "../../../etc", "must not contain '..'"),
    ("spec.model", "/etc", "not absolute"),
    ("spec.model", "models/../../etc", "must not contain '..'"),
    ("spec.model", "..", "must not contain '..'"),  # no '/', yet the trainer would load the parent folder
    ("spec.resources.cpu", "999999999999", "more than 512 cores"),
    ("spec.resources.memory", "99999999999999Ti", "more than 4Ti"),
    ("spec.retries.stuckAfterSeconds", 1e300, "less than or equal to 604800"),
]


@pytest.mark.parametrize(("field", "value", "words"), ATTACKS, ids=[f"{f}={v}" for f, v, _ in ATTACKS])
def test_validate_the_crd_and_the_run_refuse_the_same_document(
    field: str, value: Any, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = _with(field, value)
    with pytest.raises(InvalidTrainingRun) as refused:
        parse_training_run(document, "run.yaml")
    assert [f for f, _ in refused.value.errors] == [field]
    assert words in refused.value.errors[0][1]

    run_file = tmp_path / "run.json"
    run_file.write_text(__import__("json").dumps(document))
    assert run_command(["validate", str(run_file)]) == 2
    assert f"  {field}: " in capsys.readouterr().err

    assert crd_refuses(document["spec"]) == [field]
    assert [line.split(":")[0] for line in run_refuses(document, tmp_path)] == [field]


def test_cpu_the_trainer_cannot_pin_is_refused_before_the_run_not_by_a_pydantic_dump(tmp_path: Path) -> None:
    """`cpu: "600"` fits the schema's length (the API server cannot compare a quantity's value on 1.20) and
    is refused by validate and by the create handler with the same one line; before, a leg failed at run time."""
    document = _with("spec.resources.cpu", "600")
    (line,) = run_refuses(document, tmp_path)
    assert line == "spec.resources.cpu: '600' is more than 512 cores (the trainer pins at most that many threads)"
    with pytest.raises(InvalidTrainingRun) as refused:
        parse_training_run(document)
    assert refused.value.errors == [("spec.resources.cpu", line.split(": ", 1)[1])]
    assert run_refuses(_with("spec.resources.cpu", "512"), tmp_path) == []
    assert run_refuses(_with("spec.resources.cpu", "512000m"), tmp_path) == []


def test_a_300_character_name_is_told_it_is_too_long(tmp_path: Path) -> None:
    with pytest.raises(InvalidTrainingRun) as refused:
        parse_training_run(_with("metadata.name", "a" * 300))
    ((field, message),) = refused.value.errors
    assert field == "metadata.name" and message.startswith("is too long: 300 characters, must be at most 40")
    with pytest.raises(InvalidTrainingRun) as namespace:
        parse_training_run(_with("metadata.namespace", "b" * 64))
    assert namespace.value.errors == [("metadata.namespace", "is too long: 64 characters, at most 63 (a DNS label)")]


@pytest.mark.parametrize(
    "model", ["tiny", "bert-base-uncased", "google/bert_uncased_L-2_H-128_A-2", "runs/ml/base/final", "./models/x"]
)
def test_models_that_stay_inside_the_volume_pass_everywhere(model: str, tmp_path: Path) -> None:
    document = _with("spec.model", model)
    assert parse_training_run(document).spec.model == model
    assert crd_refuses(document["spec"]) == []
    assert run_refuses(document, tmp_path) == []
