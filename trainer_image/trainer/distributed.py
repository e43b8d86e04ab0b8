"""Data-parallel legs: one leg's ranks (processes), their process group, and what they agree on.

A leg started with `--processes N` (N > 1) is launched by trainer.launch under torchrun; every rank runs the
ordinary leg (train.py) with the World that torchrun's variables describe (RANK, WORLD_SIZE, LOCAL_RANK): gloo
on CPU, NCCL on CUDA. A single-process leg has World() and touches no collective, so it computes exactly what
it always did.

The global batch is the run's unit, whatever the world size: an optimizer step takes the next
`global_micro_batches` micro-batches of the deterministic global order (data.epoch_batches), fixed when the run
starts as gradientAccumulationSteps x processes; rank r takes micro-batches r, r+N, r+2N, ... of them. Each
micro-batch's loss is divided by the step's global micro-batch count and the gradients are summed across ranks
by all-reduce after the step's last micro-batch (what DDP does with no_sync during accumulation), so every rank
applies the same update and a step sees the same samples at any world size. Only the summation order differs
between world sizes (a rounding difference, measured in the README); at the same world size it is bit-exact.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from trainer.errors import InvalidInput
from trainer.reporting import Reporter

# trainer_state "dropout_rng" of runs whose dropout masks come from their micro-batch (micro_batch_rng): the same
# masks whichever rank, and however many, compute a micro-batch. Checkpoints without it (made before) keep the one
# global stream, so a run in flight resumes bit-identically across the upgrade.
MICRO_BATCH_DROPOUT = "micro_batch"
RESULTS_ENV = "RELAY_DDP_RESULTS"  # the folder where each rank records its pid and its outcome (trainer.launch)
# A collective that waits longer than this fails the rank (a peer that hangs without dying); torchrun then ends
# the leg. Long enough for the slowest single step or evaluation of a large model.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
GRADIENT_BUCKET_ELEMENTS = 25_000_000  # 100 MB of fp32 per all-reduce: bounds the extra memory of flattening


@dataclass
class World:
    """This process's place among the leg's ranks; World() is the single-process leg."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or World() outside torchrun."""
        try:
            size = int(os.environ.get("WORLD_SIZE", "1") or "1")
            rank = int(os.environ.get("RANK", "0") or "0")
            local_rank = int(os.environ.get("LOCAL_RANK", "0") or "0")
        except ValueError as exc:
            raise InvalidInput(f"WORLD_SIZE/RANK/LOCAL_RANK: not integers ({exc})") from exc
        if size < 1 or not 0 <= rank < size:
            raise InvalidInput(f"RANK {rank} / WORLD_SIZE {size}: no such rank")
        return cls(rank, size, local_rank)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes checkpoints, progress, history and final/."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # ------------------------------------------------------------------ set-up

    def start(self, device: Any) -> None:
        """Join the leg's process group (gloo on CPU, NCCL on CUDA); a no-op for one process."""
        if not self.distributed:
            return
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, rank=self.rank, world_size=self.size)
        self._device = device

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def reseed_follower(self, seed: int, step: int = 0) -> None:
        """Give ranks > 0 their own dropout stream (rank 0 keeps the single-process one): used at a fresh start,
        and on resume for a rank the checkpoint holds no RNG state of (a larger world than it was made by)."""
        if self.rank == 0:
            return
        import numpy as np
        import torch

        value = (seed * 1_000_003 + step * 7_919 + self.rank) % 2**32
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)

    # ------------------------------------------------------------------ collectives (no-ops for one process)

    def _tensor(self, values: list[float], dtype: Any) -> Any:
        import torch

        return torch.tensor(values, dtype=dtype, device=getattr(self, "_device", None))

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on any rank is true on all (an all-reduce MAX): the stop request, a checkpoint due."""
        if not self.distributed:
            return flags
        import torch
        import torch.distributed as dist

        tensor = self._tensor([float(flag) for flag in flags], torch.float32)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tuple(bool(value) for value in tensor.tolist())

    def sum_floats(self, *values: float) -> tuple[float, ...]:
        """Sum of each value over the ranks (float64): the step's loss and sample count."""
        if not self.distributed:
            return values
        import torch
        import torch.distributed as dist

        tensor = self._tensor(list(values), torch.float64)
        dist.all_reduce(tensor)
        return tuple(float(value) for value in tensor.tolist())

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        tensor = self._tensor([float(value)], torch.float64)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def gather_to_main(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on rank 0 ([] elsewhere): the ranks' RNG states for a checkpoint."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.size if self.is_main else []
        dist.gather_object(obj, gathered if self.is_main else None, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sum_gradients(self, params: list[Any]) -> None:
        """Sum every parameter's gradient over the ranks, in place (a rank that had no micro-batch in this step
        contributes zeros), in flattened buckets of GRADIENT_BUCKET_ELEMENTS."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist

        grads = []
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        bucket: list[Any] = []
        size = 0
        for grad in [*grads, None]:
            if grad is not None and (not bucket or size + grad.numel() <= GRADIENT_BUCKET_ELEMENTS):
                bucket.append(grad)
                size += grad.numel()
                continue
            if not bucket:
                break
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = ([grad], grad.numel()) if grad is not None else ([], 0)


@contextlib.contextmanager
def micro_batch_rng(seed: int, epoch: int, micro_batch: int, device: Any) -> Iterator[None]:
    """Draw the forward pass's randomness (dropout) of micro-batch `micro_batch` of `epoch` from a generator of
    its own, the global RNGs forked and left as they were: a micro-batch's masks do not depend on the rank or the
    world size that computes it, so a run resumed on another world size trains on the same masks."""
    import torch

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + micro_batch) % 2**63)
        yield


def rank_micro_batches(micro_batches: range, world: World) -> range:
    """This rank's share of one step's global micro-batches: r, r+N, r+2N, ... (may be empty for a short step)."""
    return micro_batches[world.rank :: world.size]


def accumulation_for(global_micro_batches: int, world: World, *, allow_uneven: bool, made_by: int) -> int:
    """Micro-batches each rank accumulates per step to keep the run's global batch at this world size;
    InvalidInput naming the fields when it cannot be split evenly and uneven accumulation is not allowed."""
    if global_micro_batches % world.size and not allow_uneven:
        raise InvalidInput(
            f"resources.processes: {world.size} processes cannot keep this run's global batch of "
            f"{global_micro_batches} micro-batches per step (batchSize x gradientAccumulationSteps x "
            f"{made_by} processes when it started) evenly: use a world size that divides {global_micro_batches}, "
            f"or set resources.allowUnevenAccumulation: true (ranks then accumulate unequal shares; the global "
            f"batch and the sample order are kept)"
        )
    return -(-global_micro_batches // world.size)


class FollowerReporter(Reporter):
    """A rank > 0's reporter: keeps the fields, writes no progress.json or history (rank 0 does)."""

    def history(self, **entry: Any) -> None:
        pass

    def update(self, **changes: Any) -> None:
        self.fields.update(changes)


def reporter_for(layout: Any, world: World) -> Reporter:
    return Reporter(layout) if world.is_main else FollowerReporter(layout)
