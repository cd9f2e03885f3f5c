"""One linear projection as the fused kernels take it: a base weight, an optional bias and LoRA adapter."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["Projection"]


class Projection(NamedTuple):
    """``x @ weight.T (+ bias)`` plus ``(x @ lora_a.T) @ lora_b.T * scaling`` when adapted."""

    weight: torch.Tensor  # [out, in]
    lora_a: Optional[torch.Tensor] = None  # [rank, in]
    lora_b: Optional[torch.Tensor] = None  # [out, rank]
    scaling: float = 1.0
    bias: Optional[torch.Tensor] = None  # [out]
