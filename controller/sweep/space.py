"""The search space of a TrainingSweep and the trials it yields: grid, or seeded random search. Pure, I/O-free.

A parameter is one TrainingSettings field (its camelCase name, as in `spec.training`) with a distribution:
`choice` (listed values), `uniform` and `logUniform` (floats between min and max) or `int` (integers between
min and max, both included). Random search draws from a local `random.Random(seed)`, never the global
generator: the same seed gives the same trials, in the workflow as in a test.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from trainer.config import CamelModel

ParameterType = Literal["choice", "uniform", "logUniform", "int"]
ChoiceValue = float | int | str | bool
DEFAULT_GRID_POINTS = 3
MAX_GRID_TRIALS = 10_000  # a grid larger than this is refused: a typo, not a sweep
ANY_VALUE = "a number, string or boolean"  # the CRD generator makes these nodes x-kubernetes-preserve-unknown-fields


def _values_schema(schema: dict[str, Any]) -> None:
    # A structural schema has no "number or string or bool" type: controller.sweep.crd turns the placeholder
    # (marked by its description) into x-kubernetes-preserve-unknown-fields.
    schema["items"] = {"type": "string", "description": ANY_VALUE}


class SearchParameter(CamelModel):
    """One searched TrainingSettings field: its distribution and bounds (or values)."""

    type: ParameterType = Field(description="choice, uniform, logUniform (floats, log scale) or int.")
    values: Annotated[list[ChoiceValue], Field(json_schema_extra=_values_schema)] | None = Field(
        None, description="choice: the values to try (at least one)."
    )
    min: float | None = Field(None, description="uniform, logUniform, int: the lower bound (included).")
    max: float | None = Field(None, description="uniform, logUniform, int: the upper bound (included).")
    grid_points: int = Field(
        DEFAULT_GRID_POINTS, ge=1, le=1000, description="grid search over uniform/logUniform: evenly spaced points."
    )

    @model_validator(mode="after")
    def _shape(self) -> SearchParameter:
        if self.type == "choice":
            if not self.values:
                raise ValueError("values: choice needs at least one value")
            if self.min is not None or self.max is not None:
                raise ValueError("min/max: not used by choice (list the values)")
            return self
        if self.values is not None:
            raise ValueError(f"values: only for choice, not {self.type} (give min and max)")
        if self.min is None or self.max is None:
            raise ValueError(f"min and max: both required for {self.type}")
        if self.min > self.max:
            raise ValueError(f"min: {self.min:g} is greater than max {self.max:g}")
        if self.type == "logUniform" and self.min <= 0:
            raise ValueError(f"min: logUniform needs a positive lower bound, not {self.min:g}")
        if self.type == "int" and not (float(self.min).is_integer() and float(self.max).is_integer()):
            raise ValueError("min/max: int needs whole-number bounds")
        return self

    def extremes(self) -> list[ChoiceValue]:
        """Every value a trial may get at the edges: the choices, or the two bounds (checked against the field)."""
        if self.type == "choice":
            assert self.values is not None
            return list(self.values)
        assert self.min is not None and self.max is not None
        if self.type == "int":
            return [int(self.min), int(self.max)]
        return [self.min, self.max]

    def grid(self) -> list[ChoiceValue]:
        """The values grid search tries, in order."""
        if self.type == "choice":
            assert self.values is not None
            return list(self.values)
        assert self.min is not None and self.max is not None
        low, high = self.min, self.max
        if self.type == "int":
            return list(range(int(low), int(high) + 1))
        if self.grid_points == 1 or low == high:
            return [low]
        spaced = (i / (self.grid_points - 1) for i in range(self.grid_points))
        if self.type == "logUniform":
            return [math.exp(math.log(low) + f * (math.log(high) - math.log(low))) for f in spaced]
        return [low + f * (high - low) for f in spaced]

    def sample(self, rng: random.Random) -> ChoiceValue:
        """One value drawn from `rng`."""
        if self.type == "choice":
            assert self.values is not None
            return self.values[rng.randrange(len(self.values))]
        assert self.min is not None and self.max is not None
        if self.type == "int":
            return rng.randint(int(self.min), int(self.max))
        if self.type == "logUniform":
            return math.exp(rng.uniform(math.log(self.min), math.log(self.max)))
        return rng.uniform(self.min, self.max)


def grid_size(space: Mapping[str, SearchParameter]) -> int:
    return math.prod(len(parameter.grid()) for parameter in space.values())


def grid_trials(space: Mapping[str, SearchParameter], max_trials: int | None = None) -> list[dict[str, ChoiceValue]]:
    """The cartesian product of every parameter's grid, fields in name order, the last field varying fastest."""
    names = sorted(space)
    product: Iterator[tuple[ChoiceValue, ...]] = itertools.product(*(space[name].grid() for name in names))
    if max_trials is not None:
        product = itertools.islice(product, max_trials)
    return [dict(zip(names, values, strict=True)) for values in product]


def random_trials(space: Mapping[str, SearchParameter], seed: int, count: int) -> list[dict[str, ChoiceValue]]:
    """`count` trials drawn from a private `random.Random(seed)`, fields drawn in name order."""
    rng = random.Random(seed)
    names = sorted(space)
    return [{name: space[name].sample(rng) for name in names} for _ in range(count)]


def trial_assignments(
    space: Mapping[str, SearchParameter],
    algorithm: Literal["grid", "random"],
    seed: int,
    max_trials: int | None,
) -> list[dict[str, ChoiceValue]]:
    """Each trial's field values (camelCase names), in trial order. Random search needs max_trials."""
    if algorithm == "grid":
        return grid_trials(space, max_trials)
    if max_trials is None:
        raise ValueError("maxTrials: random search needs it")
    return random_trials(space, seed, max_trials)
