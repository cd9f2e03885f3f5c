"""Whether a 4-bit (QLoRA) base keeps its dense weights for the run: a pure decision, no torch.

Each bitsandbytes 4-bit projection is dequantised every time it runs: in the forward, again in the
backward (and in the recomputation under checkpointing). On a QLoRA step of a small model those
dequantisations, each a kernel and its Python, are a large part of the step's time
(``docs/kernel-notes.md``). Keeping the dense copies removes them all: every weight is dequantised
once per ``train()``, by bitsandbytes' own kernel, so the step computes the same numbers.

The copies cost the 16-bit model's size, held for the whole run. They are kept only where memory is
plainly there: when the no-checkpointing step's upper bound (``bound.py``), the optimizer state still
to come and the copies together stay under the budget. A probed decision keeps none: the probe
measures steps without the copies, and a card that needed a probe has no room to spare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .policy import gib as _gib


@dataclass(frozen=True)
class DenseChoice:
    """Kept or not, the copies' size, and why."""

    keep: bool
    copies_bytes: int  # the dense copies of every 4-bit weight (what keeping them holds)
    reason: str


def choose(copies_bytes: int, bound: Optional[int], extra: int, budget: Optional[int],
           off_reason: Optional[str] = None) -> Optional[DenseChoice]:
    """The choice for a run whose 4-bit weights take ``copies_bytes`` dense (None: no 4-bit weights).

    ``bound`` is the no-checkpointing step's upper bound when ``none`` was chosen from it without a probe
    (else None), ``extra`` the memory that comes later in training, ``budget`` what both must stay under;
    ``off_reason`` says why the user turned keeping off."""
    if copies_bytes <= 0:
        return None
    if off_reason:
        return DenseChoice(False, copies_bytes, f"4-bit weights dequantised per call: {off_reason}")
    if bound is None or budget is None:
        return DenseChoice(False, copies_bytes, "4-bit weights dequantised per call: the policy was probed (the "
                                                "probe measures steps without dense copies, and no room is spare)")
    need = bound + extra + copies_bytes
    if need > budget:
        return DenseChoice(False, copies_bytes, f"4-bit weights dequantised per call: their dense copies "
                                                f"({_gib(copies_bytes)}) beside the step's bound and the optimizer "
                                                f"state ({_gib(need)} together) exceed the budget ({_gib(budget)})")
    return DenseChoice(True, copies_bytes, f"4-bit weights dequantised once and kept dense for the run "
                                           f"({_gib(copies_bytes)}; {_gib(need)} with the step's bound and the "
                                           f"optimizer state, under the budget of {_gib(budget)})")


def overruled(choice: Optional[DenseChoice], why: str) -> Optional[DenseChoice]:
    """``choice`` not kept after all (``why``): the copies were chosen beside a ``none`` the run will not use."""
    if choice is None or not choice.keep:
        return choice
    return DenseChoice(False, choice.copies_bytes, f"4-bit weights dequantised per call: {why}")
