"""How a bitsandbytes 4-bit base weight meets its input in a fused LoRA projection: a pure decision.

Three ways, in the order they are preferred, each rejected one carrying its reason:

* ``kept dense``: the weight was dequantised once for this ``train()`` and is kept
  (``checkpointing/dense_4bit.py`` decides it from the room); the matmul is cuBLAS on a 16-bit weight,
  with nothing to dequantise. Fastest where it fits (+8.7% steady over per-call dequantisation, H100).
* ``fused``: our Triton kernels (``kernels/linear_4bit.py``) dequantise tiles in registers inside the
  matmul: no 16-bit copy of the weight and one launch instead of two, forward and backward. Asked for
  with ``UNSLOTH_PATCH_MATMUL_4BIT=fused``; not the default: on an H100 it was 15-32x slower per
  projection than bitsandbytes + cuBLAS at training sizes, each row tile dequantising the whole weight
  again (``docs/kernel-notes.md``).
* ``bitsandbytes``: bitsandbytes dequantises the whole weight into a temporary, cuBLAS multiplies. Always
  possible; the default where the weight is not kept dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["KEPT_DENSE", "FUSED", "BITSANDBYTES", "OPTIONS", "Facts", "Choice", "choose"]

KEPT_DENSE = "kept dense"
FUSED = "fused"
BITSANDBYTES = "bitsandbytes"
OPTIONS = (KEPT_DENSE, FUSED, BITSANDBYTES)


@dataclass(frozen=True)
class Facts:
    """What the decision reads about one 4-bit weight in one ``train()``."""

    setting: str  # UNSLOTH_PATCH_MATMUL_4BIT: "bitsandbytes" or "fused"
    kept_dense: bool  # this run keeps the dense copies (the dense-4-bit decision chose it)
    dense_reason: str = ""  # why the run keeps none, when it keeps none
    kernel_reason: Optional[str] = None  # why the fused kernels cannot take this weight here (None: they can)
    kernel_failed: bool = False  # a launch of the fused kernels failed earlier in this process


@dataclass(frozen=True)
class Choice:
    option: str
    rejected: dict = field(default_factory=dict)  # option -> why not

    def describe(self) -> str:
        others = "; ".join(f"not {name}: {why}" for name, why in self.rejected.items())
        return self.option + (f" ({others})" if others else "")


def choose(facts: Facts) -> Choice:
    """The first of :data:`OPTIONS` that the facts allow, with the reason each earlier one was passed over."""
    rejected = {}
    if facts.kept_dense:
        return Choice(KEPT_DENSE)
    rejected[KEPT_DENSE] = facts.dense_reason or "this run keeps no dense copies"
    if facts.setting != FUSED:
        rejected[FUSED] = ("not asked for (UNSLOTH_PATCH_MATMUL_4BIT=fused; measured 15-32x slower than "
                           "bitsandbytes + cuBLAS at training sizes)")
    elif facts.kernel_failed:
        rejected[FUSED] = "its kernel failed earlier in this process (warned then)"
    elif facts.kernel_reason:
        rejected[FUSED] = f"the kernels cannot take it: {facts.kernel_reason}"
    else:
        return Choice(FUSED, rejected)
    return Choice(BITSANDBYTES, rejected)
