"""One linear projection as the fused kernels take it: a base weight (plain, or bitsandbytes 4-bit with its
quantisation state), an optional bias and LoRA adapter."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["Projection", "dense_weight"]


class Projection(NamedTuple):
    """``x @ weight.T (+ bias)`` plus ``(x @ lora_a.T) @ lora_b.T * scaling`` when adapted."""

    weight: torch.Tensor  # [out, in]
    lora_a: Optional[torch.Tensor] = None  # [rank, in]
    lora_b: Optional[torch.Tensor] = None  # [out, rank]
    scaling: float = 1.0
    bias: Optional[torch.Tensor] = None  # [out]
    quant_state: object = None  # bitsandbytes' QuantState when ``weight`` holds packed 4-bit values

    @property
    def in_features(self) -> int:
        return self.quant_state.shape[-1] if self.quant_state is not None else self.weight.shape[-1]

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the base weight computes in (a 4-bit weight's: the one it dequantises to)."""
        return self.quant_state.dtype if self.quant_state is not None else self.weight.dtype


def dense_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The base weight in ``dtype``: a 4-bit one dequantised by bitsandbytes (bit for bit what its layer uses)."""
    if quant_state is None:
        return weight.to(dtype)
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight, quant_state).to(dtype)
