"""ASHA: rung steps, and which waiting trials a set of rung results promotes."""

from __future__ import annotations

import math

import pytest

from controller.sweep.asha import Rungs, promotions, ranked


@pytest.mark.parametrize(
    ("min_steps", "max_steps", "factor", "steps"),
    [
        (10, 40, 2, [10, 20]),
        (10, 41, 2, [10, 20, 40]),
        (5, 100, 3, [5, 15, 45]),
        (1, 2, 2, [1]),
        (30, 31, 4, [30]),
    ],
)
def test_rung_steps(min_steps: int, max_steps: int, factor: int, steps: list[int]) -> None:
    assert Rungs(min_steps, max_steps, factor).steps == steps


def test_next_stop() -> None:
    rungs = Rungs(10, 40, 2)
    assert [rungs.next_stop(s) for s in (0, 9, 10, 15, 20, 39)] == [10, 10, 20, 20, 40, 40]


@pytest.mark.parametrize(
    ("min_steps", "max_steps", "factor", "message"),
    [(0, 10, 2, "minSteps"), (10, 10, 2, "maxSteps: 10 must be greater"), (10, 40, 1, "reductionFactor")],
)
def test_bad_rungs(min_steps: int, max_steps: int, factor: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rungs(min_steps, max_steps, factor)


ORDER = {"t0": 0, "t1": 1, "t2": 2, "t3": 3, "t4": 4}


@pytest.mark.parametrize(
    ("rung_results", "waiting", "factor", "maximize", "promoted"),
    [
        # alone at a rung: floor(1/2) = 0 places, it waits
        ({0: {"t0": 0.5}}, {"t0": 0}, 2, False, []),
        # two at the rung, one place: the lower loss goes on, the other keeps waiting
        ({0: {"t0": 0.5, "t1": 0.4}}, {"t0": 0, "t1": 0}, 2, False, ["t1"]),
        # the same by accuracy (maximize): the higher goes on
        ({0: {"t0": 0.5, "t1": 0.4}}, {"t0": 0, "t1": 0}, 2, True, ["t0"]),
        # a place already taken by a promoted trial (t1, no longer waiting) leaves none for t0
        ({0: {"t0": 0.5, "t1": 0.4}}, {"t0": 0}, 2, False, []),
        # four at the rung, two places: t1 already promoted, t2 the second best is promoted now
        ({0: {"t0": 0.9, "t1": 0.1, "t2": 0.3, "t3": 0.5}}, {"t0": 0, "t2": 0, "t3": 0}, 2, False, ["t2"]),
        # reduction factor 3: three at the rung make one place
        ({0: {"t0": 0.3, "t1": 0.2, "t2": 0.1}}, {"t0": 0, "t1": 0, "t2": 0}, 3, False, ["t2"]),
        ({0: {"t0": 0.3, "t1": 0.2}}, {"t0": 0, "t1": 0}, 3, False, []),
        # ties go to the earlier trial
        ({0: {"t0": 0.2, "t1": 0.2}}, {"t0": 0, "t1": 0}, 2, False, ["t0"]),
        # NaN ranks last whatever the goal
        ({0: {"t0": math.nan, "t1": 0.9}}, {"t0": 0, "t1": 0}, 2, False, ["t1"]),
        ({0: {"t0": math.nan, "t1": 0.1}}, {"t0": 0, "t1": 0}, 2, True, ["t1"]),
        # rungs are separate: t3 waits at rung 1 alone, t2 at rung 0 is in the top 2 of 4
        (
            {0: {"t0": 0.9, "t1": 0.1, "t2": 0.3, "t3": 0.2}, 1: {"t3": 0.15}},
            {"t0": 0, "t2": 0, "t3": 1},
            2,
            False,
            [],
        ),
        (
            {0: {"t0": 0.9, "t1": 0.5, "t2": 0.3, "t3": 0.2}, 1: {"t3": 0.15, "t4": 0.1}},
            {"t0": 0, "t1": 0, "t3": 1, "t4": 1},
            2,
            False,
            ["t4"],
        ),
    ],
)
def test_promotions(
    rung_results: dict[int, dict[str, float]],
    waiting: dict[str, int],
    factor: int,
    maximize: bool,
    promoted: list[str],
) -> None:
    assert promotions(rung_results, waiting, ORDER, factor, maximize) == promoted


def test_ranked() -> None:
    assert ranked({"t2": 0.3, "t0": 0.3, "t1": 0.1}, ORDER, maximize=False) == ["t1", "t0", "t2"]
    assert ranked({"t2": 0.3, "t0": math.nan, "t1": 0.1}, ORDER, maximize=True) == ["t2", "t1", "t0"]
