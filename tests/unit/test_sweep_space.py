"""The sweep's search space: each distribution's grid and draws, the same seed giving the same trials."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from pydantic import ValidationError

from controller.sweep.space import SearchParameter, grid_size, grid_trials, random_trials, trial_assignments


def _p(**fields: Any) -> SearchParameter:
    return SearchParameter.model_validate(fields)


@pytest.mark.parametrize(
    ("parameter", "grid"),
    [
        ({"type": "choice", "values": [8, 16, 32]}, [8, 16, 32]),
        ({"type": "choice", "values": ["fp32", "bf16"]}, ["fp32", "bf16"]),
        ({"type": "int", "min": 2, "max": 5}, [2, 3, 4, 5]),
        ({"type": "uniform", "min": 0.0, "max": 0.1, "gridPoints": 3}, [0.0, 0.05, 0.1]),
        ({"type": "logUniform", "min": 1e-5, "max": 1e-3, "gridPoints": 3}, [1e-5, 1e-4, 1e-3]),
        ({"type": "uniform", "min": 0.3, "max": 0.7, "gridPoints": 1}, [0.3]),
    ],
)
def test_grid_values(parameter: dict[str, Any], grid: list[Any]) -> None:
    got = _p(**parameter).grid()
    assert len(got) == len(grid)
    for value, expected in zip(got, grid, strict=True):
        assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected
        assert type(value) is type(expected)


def test_choice_keeps_each_value_type() -> None:
    assert [type(v) for v in _p(type="choice", values=[16, 0.5, True, "cpu"]).grid()] == [int, float, bool, str]


@pytest.mark.parametrize(
    ("parameter", "message"),
    [
        ({"type": "choice", "values": []}, "choice needs at least one value"),
        ({"type": "choice"}, "choice needs at least one value"),
        ({"type": "choice", "values": [1], "min": 0}, "not used by choice"),
        ({"type": "uniform", "min": 0.1}, "min and max: both required for uniform"),
        ({"type": "uniform", "min": 0.2, "max": 0.1}, "min: 0.2 is greater than max 0.1"),
        ({"type": "logUniform", "min": 0, "max": 1}, "logUniform needs a positive lower bound"),
        ({"type": "int", "min": 1.5, "max": 4}, "int needs whole-number bounds"),
        ({"type": "int", "values": [1, 2]}, "values: only for choice"),
        ({"type": "normal", "min": 0, "max": 1}, "Input should be 'choice', 'uniform', 'logUniform' or 'int'"),
    ],
)
def test_bad_parameter_is_refused(parameter: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _p(**parameter)


def test_grid_is_the_cartesian_product_in_field_name_order() -> None:
    space = {
        "learningRate": _p(type="choice", values=[1e-4, 1e-3]),
        "batchSize": _p(type="choice", values=[8, 16, 32]),
    }
    trials = grid_trials(space)
    assert grid_size(space) == 6 == len(trials)
    assert trials[:4] == [
        {"batchSize": 8, "learningRate": 1e-4},
        {"batchSize": 8, "learningRate": 1e-3},
        {"batchSize": 16, "learningRate": 1e-4},
        {"batchSize": 16, "learningRate": 1e-3},
    ]
    assert grid_trials(space, max_trials=4) == trials[:4]


def test_random_search_is_seeded_and_within_bounds() -> None:
    space = {
        "learningRate": _p(type="logUniform", min=1e-5, max=1e-2),
        "weightDecay": _p(type="uniform", min=0.0, max=0.1),
        "batchSize": _p(type="int", min=4, max=32),
        "precision": _p(type="choice", values=["fp32", "bf16"]),
    }
    first = random_trials(space, seed=7, count=20)
    assert first == random_trials(space, seed=7, count=20)  # same seed, same trials
    assert first != random_trials(space, seed=8, count=20)
    assert random_trials(space, seed=7, count=5) == first[:5]  # more trials extend, never reshuffle
    for trial in first:
        assert isinstance(trial["learningRate"], float) and 1e-5 <= trial["learningRate"] <= 1e-2
        assert isinstance(trial["weightDecay"], float) and 0.0 <= trial["weightDecay"] <= 0.1
        assert isinstance(trial["batchSize"], int) and 4 <= trial["batchSize"] <= 32
        assert trial["precision"] in ("fp32", "bf16")
    logs = [math.log10(float(t["learningRate"])) for t in random_trials(space, seed=1, count=400)]
    assert sum(lr < -3.5 for lr in logs) > 120  # log scale: half the draws below the geometric middle


def test_random_search_leaves_the_global_generator_alone() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    random_trials({"learningRate": _p(type="uniform", min=0.0, max=1.0)}, seed=1, count=10)
    assert random.random() == expected


def test_trial_assignments_by_algorithm() -> None:
    space = {"batchSize": _p(type="choice", values=[8, 16, 32])}
    assert trial_assignments(space, "grid", 0, None) == [{"batchSize": 8}, {"batchSize": 16}, {"batchSize": 32}]
    assert trial_assignments(space, "grid", 0, 2) == [{"batchSize": 8}, {"batchSize": 16}]
    assert len(trial_assignments(space, "random", 3, 5)) == 5
    with pytest.raises(ValueError, match="maxTrials: random search needs it"):
        trial_assignments(space, "random", 3, None)
