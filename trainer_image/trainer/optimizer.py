"""The run's AdamW: which kernel implementation steps it (fused, foreach, or torch's default), chosen once per run.

A fresh run takes the fastest one the device has: `fused` (one kernel for every parameter; CPU fused AdamW since
torch 2.4), else `foreach`. Measured on MiniLM, 2 torch threads, one optimizer step on CPU: 84.7 ms with torch's
default (a Python loop over the parameters), 55.8 ms foreach, 7.8 ms fused; about 23% of the training loop.

The implementations round differently, so a run keeps the one it started with: a resume rebuilds AdamW with the
implementation its checkpoint's param groups name (checkpoints written before this module name none: torch's
default, exactly what those runs stepped with). Each implementation on its own is elementwise, so the result
does not depend on the thread count, and a stopped and resumed run ends bit-identical to an uninterrupted one
(tests/trainer/test_trainer_optimizer.py). A checkpoint whose implementation this device lacks (a fused CUDA
run resumed where fused is unavailable) is refused rather than continued with other rounding.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.optim.optimizer import _get_foreach_kernels_supported_devices, _get_fused_kernels_supported_devices

from trainer.errors import InvalidInput

Implementation = Literal["fused", "foreach", "default"]
IMPLEMENTATIONS: tuple[Implementation, ...] = ("fused", "foreach", "default")
# Fused AdamW kernels exist for these parameter dtypes (torch.optim.adamw's own check).
_FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def fastest_implementation(device: torch.device, params: list[torch.nn.Parameter]) -> Implementation:
    """`fused` where the device has fused AdamW kernels for every parameter's dtype, else `foreach` where it
    has foreach kernels, else torch's default."""
    if device.type in _get_fused_kernels_supported_devices() and all(p.dtype in _FUSED_DTYPES for p in params):
        return "fused"
    if device.type in _get_foreach_kernels_supported_devices():
        return "foreach"
    return "default"


def implementation_of(param_groups: list[dict[str, Any]]) -> Implementation:
    """The implementation that optimizer param groups (live, or as saved in a checkpoint's optimizer.json) step
    with: `fused` / `foreach` when set, else torch's default (what checkpoints from before this module hold)."""
    first = param_groups[0] if param_groups else {}
    if first.get("fused"):
        return "fused"
    if first.get("foreach"):
        return "foreach"
    return "default"


def build_adamw(
    groups: list[dict[str, Any]], *, lr: float, device: torch.device, implementation: Implementation | None
) -> torch.optim.AdamW:
    """AdamW over `groups` stepping with `implementation` (None: the fastest this device has); InvalidInput
    naming the implementation when a resumed run's one is not available here."""
    params = [p for group in groups for p in group["params"]]
    chosen = implementation or fastest_implementation(device, params)
    if implementation == "fused" and fastest_implementation(device, params) != "fused":
        raise InvalidInput(
            f"optimizer: the checkpoint was made with fused AdamW, which {device.type} lacks here "
            "(another implementation rounds differently; resume on a device with fused AdamW)"
        )
    # None leaves the choice to torch: what the trainer did before this module (the "default" implementation).
    return torch.optim.AdamW(
        groups, lr=lr, fused=True if chosen == "fused" else None, foreach=True if chosen == "foreach" else None
    )
