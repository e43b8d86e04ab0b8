"""TrainingSweep validation: each bad input refused naming the field, by pydantic and by `relay validate`; the CRD
generated from the same models carries the rules the API server can state."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.cli import run_command
from controller.sweep.crd import crd_manifest, render
from controller.sweep.crd import main as crd_main
from controller.sweep.spec import InvalidTrainingSweep, parse_training_sweep

REPO = Path(__file__).resolve().parents[2]

GOOD: dict[str, Any] = {
    "apiVersion": "relay.dev/v1alpha1",
    "kind": "TrainingSweep",
    "metadata": {"name": "lr-sweep", "namespace": "ml"},
    "spec": {
        "template": {"model": "tiny", "dataset": {"source": "demo"}, "training": {"batchSize": 8}},
        "searchSpace": {
            "learningRate": {"type": "logUniform", "min": 1e-5, "max": 1e-3},
            "batchSize": {"type": "choice", "values": [8, 16]},
            "warmupRatio": {"type": "uniform", "min": 0.0, "max": 0.2},
            "gradientAccumulationSteps": {"type": "int", "min": 1, "max": 4},
        },
        "algorithm": "random",
        "seed": 3,
        "maxTrials": 6,
        "maxConcurrentTrials": 2,
        "objective": {"metric": "accuracy", "goal": "maximize"},
        "asha": {"minSteps": 20, "maxSteps": 160, "reductionFactor": 2},
    },
}


def _with(path: str, value: Any) -> dict[str, Any]:
    document = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = document
    for key in parents:
        node = node[key]
    node[last] = value
    return document


# (change, the field named, words of the message)
BAD: list[tuple[str, Any, str, str]] = [
    ("spec.searchSpace", {}, "spec.searchSpace", "at least one training field"),
    (
        "spec.searchSpace",
        {"dropout": {"type": "uniform", "min": 0, "max": 1}},
        "spec.searchSpace",
        "'dropout' is not a",
    ),
    ("spec.maxConcurrentTrials", 0, "spec.maxConcurrentTrials", "greater than or equal to 1"),
    ("spec.objective.metric", "bleu", "spec.objective.metric", "'eval_loss', 'accuracy' or 'f1_macro'"),
    ("spec.objective.goal", "lowest", "spec.objective.goal", "'minimize' or 'maximize'"),
    ("spec.maxTrials", None, "spec", "maxTrials: random search needs it"),
    ("spec.maxTrials", 0, "spec.maxTrials", "greater than or equal to 1"),
    ("spec.algorithm", "bayes", "spec.algorithm", "'grid' or 'random'"),
    (
        "spec.searchSpace.learningRate",
        {"type": "uniform", "min": 0.5, "max": 2},
        "spec",
        "searchSpace.learningRate: value 2.0 is not a valid learningRate",
    ),
    ("spec.searchSpace.batchSize", {"type": "choice", "values": []}, "spec.searchSpace.batchSize", "at least one"),
    ("spec.searchSpace.maxSteps", {"type": "int", "min": 10, "max": 50}, "spec", "searchSpace.maxSteps: set by asha"),
    ("spec.asha.maxSteps", 20, "spec.asha", "maxSteps: 20 must be greater than minSteps 20"),
    ("spec.asha.reductionFactor", 1, "spec.asha.reductionFactor", "greater than or equal to 2"),
    ("spec.template.training.evalEverySteps", 15, "spec", "asha.minSteps: 20 is not a multiple"),
    ("spec.template.training.batchSize", 0, "spec.template.training.batchSize", "greater than or equal to 1"),
    ("metadata.name", "a" * 36, "metadata.name", "at most 35"),
    ("spec.bogus", 1, "spec.bogus", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("path", "value", "field", "message"), BAD, ids=[f"{b[0]}={b[1]!r}"[:60] for b in BAD])
def test_bad_input_is_refused_naming_the_field(path: str, value: Any, field: str, message: str) -> None:
    with pytest.raises(InvalidTrainingSweep) as raised:
        parse_training_sweep(_with(path, value))
    assert any(name == field and message in text for name, text in raised.value.errors), raised.value.errors


def test_relay_validate_refuses_each_bad_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, (path, value, field, message) in enumerate(BAD[:4]):  # the four the issue names
        bad = tmp_path / f"bad{i}.yaml"
        bad.write_text(yaml.safe_dump(_with(path, value)))
        assert run_command(["validate", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "invalid TrainingSweep" in err and f"  {field}: " in err and message in err and "Traceback" not in err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    assert run_command(["validate", str(good)]) == 0
    assert (
        "valid TrainingSweep ml/lr-sweep (6 trials, 2 at once, ASHA rungs [20, 40, 80] to 160)"
        in capsys.readouterr().out
    )


def test_the_example_sweep_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(["validate", str(REPO / "manifests/examples/sweep-tiny.yaml")]) == 0
    assert "valid TrainingSweep default/sweep-tiny" in capsys.readouterr().out


def test_trial_specs_take_the_values_and_the_asha_budget() -> None:
    spec = parse_training_sweep(GOOD).spec
    assignments = spec.assignments()
    assert len(assignments) == 6 and assignments == parse_training_sweep(GOOD).spec.assignments()
    for values in assignments:
        training = spec.trial_spec(values).training
        assert training.learning_rate == values["learningRate"] and training.batch_size == values["batchSize"]
        assert training.max_steps == 160 and training.eval_every_steps == 20  # every rung is evaluated
    assert spec.trial_spec(assignments[0]).dataset == spec.template.dataset


def test_the_committed_crd_matches_the_models() -> None:
    assert crd_main(["--check"]) == 0
    assert (REPO / "manifests/crd/trainingsweeps.relay.dev.yaml").read_text() == render()


def test_the_crd_states_what_the_api_server_can_refuse() -> None:
    version = crd_manifest()["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority") is None]
    assert columns == ["Phase", "Trials", "Running", "Pruned", "Best", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["maxConcurrentTrials"]["minimum"] == 1
    assert spec["properties"]["objective"]["properties"]["metric"]["enum"] == ["eval_loss", "accuracy", "f1_macro"]
    space = spec["properties"]["searchSpace"]
    assert (
        space["minProperties"] == 1 and "dropout" not in space["properties"] and "learningRate" in space["properties"]
    )
    values = space["properties"]["batchSize"]["properties"]["values"]["items"]
    assert values.get("x-kubernetes-preserve-unknown-fields") is True and "type" not in values
