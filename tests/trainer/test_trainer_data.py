"""The data order: every row once per epoch, fixed batch count, same batches for the same (seed, epoch) in any
process, length grouping that cuts padding; and the evaluation metrics."""

from __future__ import annotations

import random

from trainer.data import epoch_batches, micro_batches_per_epoch, steps_per_epoch
from trainer.evaluation import classification_metrics
from trainer.leg_state import Plan, Totals


def lengths(rows: int) -> list[int]:
    rng = random.Random(3)
    return [rng.randint(3, 120) for _ in range(rows)]


def test_every_row_once_and_only_the_last_batch_short() -> None:
    sizes = lengths(1013)
    batches = epoch_batches(sizes, 16, seed=42, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(1013))
    assert len(batches) == micro_batches_per_epoch(1013, 16) == 64
    assert [len(b) for b in batches[:-1]] == [16] * 63 and len(batches[-1]) == 1013 - 63 * 16


def test_same_seed_and_epoch_same_batches_other_epoch_other_batches() -> None:
    sizes = lengths(500)
    assert epoch_batches(sizes, 8, seed=1, epoch=2) == epoch_batches(sizes, 8, seed=1, epoch=2)
    assert epoch_batches(sizes, 8, seed=1, epoch=2) != epoch_batches(sizes, 8, seed=1, epoch=3)
    assert epoch_batches(sizes, 8, seed=1, epoch=2) != epoch_batches(sizes, 8, seed=2, epoch=2)


def test_the_order_does_not_touch_the_global_rng() -> None:
    import torch

    torch.manual_seed(5)
    before = torch.get_rng_state()
    epoch_batches(lengths(100), 8, seed=1, epoch=0)
    assert torch.equal(before, torch.get_rng_state())


def test_length_grouping_cuts_padding() -> None:
    sizes = lengths(3200)
    batches = epoch_batches(sizes, 16, seed=0, epoch=0)
    padded = sum(len(b) * max(sizes[i] for i in b) for b in batches)
    rng = random.Random(0)
    order = list(range(3200))
    rng.shuffle(order)
    plain = sum(16 * max(sizes[i] for i in order[s : s + 16]) for s in range(0, 3200, 16))
    assert padded < 0.7 * plain, (padded, plain)


def test_steps_per_epoch_with_accumulation() -> None:
    assert steps_per_epoch(160, 8, 2) == 10
    assert steps_per_epoch(161, 8, 2) == 11  # 21 micro-batches: the last step accumulates one
    assert steps_per_epoch(7, 8, 4) == 1


def test_the_plan_runs_every_micro_batch_of_an_epoch_once() -> None:
    plan = Plan(total_steps=33, steps_per_epoch=11, micro_batches_per_epoch=21, accumulation=2)
    for epoch in range(3):
        first = epoch * plan.steps_per_epoch
        steps = range(first, first + plan.steps_per_epoch)
        assert {plan.epoch(step) for step in steps} == {epoch}
        micro = [index for step in steps for index in plan.micro_batches(step)]
        assert micro == list(range(21)), "in order, each once; the epoch's last step accumulates one"
    assert plan.first_micro_batch(12) == 2  # what trainer_state.json records as batch_in_epoch


def test_totals_survive_the_trip_through_trainer_state() -> None:
    totals = Totals()
    for step in range(60):
        totals.add_step(0.5 + step / 100, 8)
    saved = {"step": totals.step, "loss_sum": totals.loss_sum, "samples_seen": totals.samples_seen}
    saved["recent_losses"] = list(totals.recent_losses)
    restored = Totals()
    restored.restore(saved)
    assert restored == totals and len(restored.recent_losses) == 50
    assert restored.recent_losses.maxlen == totals.recent_losses.maxlen


def test_classification_metrics() -> None:
    metrics = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0])
    assert metrics["accuracy"] == 3 / 5
    # F1 per class: 0 -> 2*1/(2+1+1)=0.5, 1 -> 2*2/(4+1+0)=0.8, 2 -> 0
    assert abs(metrics["f1_macro"] - (0.5 + 0.8 + 0.0) / 3) < 1e-12
