"""Training memory per parameter, by optimizer and precision.

The figures follow the accounting of the ZeRO paper (Rajbhandari et al., "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", SC 2020, section 3.1): mixed
precision Adam keeps an fp16/bf16 parameter and gradient (2 + 2 bytes) plus an fp32 master
copy, momentum and variance (4 + 4 + 4 bytes): 16 bytes per parameter. See
docs/cost_models.md for the whole table.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from fxshard.errors import CostModelError

__all__ = ["Optimizer", "Precision", "TrainingMemory", "bytes_per_parameter", "training_memory"]

Optimizer = Literal["adam", "sgd", "none"]
Precision = Literal["fp32", "mixed"]

# Optimizer state in fp32 bytes per parameter: Adam (and AdamW) keeps two moments; SGD as
# torch.optim.SGD builds it by default (momentum=0) keeps none; "none" is gradients only: no
# optimizer state and no fp32 master copy (the optimizer step is the user's, in place).
_STATE_BYTES = {"adam": 8, "sgd": 0, "none": 0}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingMemory:
    """Bytes per parameter, split by what holds them."""

    weights: int
    gradients: int
    master_weights: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.master_weights + self.optimizer_state


def training_memory(optimizer: str = "adam", precision: str = "fp32", *,
                    training: bool = True, param_dtype_bytes: int | None = None) -> TrainingMemory:
    """Bytes each parameter costs in training (or inference) with this optimizer.

    Args:
        optimizer: "adam" (also AdamW), "sgd" (torch.optim.SGD's default, no momentum: no
            state) or "none" (gradients only, no optimizer state, no fp32 master copy).
        precision: "fp32", or "mixed" (16-bit weights and gradients, fp32 master weights).
        training: False gives the weights alone.
        param_dtype_bytes: bytes of the stored weights, when they differ from the precision's
            default (4 for fp32, 2 for mixed).

    Raises:
        CostModelError: an unknown optimizer or precision.
    """
    if optimizer not in _STATE_BYTES:
        raise CostModelError(f"optimizer={optimizer!r} is unknown; use one of "
                             f"{', '.join(map(repr, _STATE_BYTES))}")
    if precision not in ("fp32", "mixed"):
        raise CostModelError(f"precision={precision!r} is unknown; use 'fp32' or 'mixed'")
    weight = param_dtype_bytes or (4 if precision == "fp32" else 2)
    if not training:
        return TrainingMemory(weights=weight, gradients=0, master_weights=0, optimizer_state=0)
    master = 4 if precision == "mixed" and optimizer != "none" else 0
    return TrainingMemory(weights=weight, gradients=weight, master_weights=master,
                          optimizer_state=_STATE_BYTES[optimizer])


def bytes_per_parameter(optimizer: str = "adam", precision: str = "fp32", *, training: bool = True) -> int:
    """Total bytes per parameter (16 for mixed-precision Adam, as in ZeRO)."""
    return training_memory(optimizer, precision, training=training).total
