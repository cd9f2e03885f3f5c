"""The memory model: a step's peak from smaller steps' phases (pure arithmetic, no torch).

A step's live memory is, phase by phase (see ``meter``), a part that does not grow with the
number of sequences (weights, buffers, the gradients already allocated, fixed-size workspaces)
plus a part that grows with each further sequence of the same length (activations, attention,
rows of logits). Which phase holds the peak can change with the batch size: with few sequences a
backward phase (gradients, a recomputed layer) may dominate, with more a forward phase whose
activations grow faster (a chunked loss head's logits, say). So the peak is predicted per phase
and the largest prediction is the step's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One measured step: ``sequences`` copies of the longest sequence (or the batch itself)."""

    sequences: int
    baseline: int  # bytes held before the step, less its batch (parameters, buffers, existing gradients)
    phases: tuple  # (peak bytes, gradient bytes present when the phase began) per phase, in order

    @property
    def peak(self) -> int:
        return max((p for p, _ in self.phases), default=self.baseline)


def extrapolate(small: Step, large: Step, count: int) -> int:
    """The peak of a step of ``count`` sequences from two smaller steps of the same layout.

    Per phase: the larger step's peak plus its growth per sequence between the two steps, for every
    further sequence. Phases are matched by position, which holds when the step's control flow does
    not depend on its size (the probe cuts steps at layer boundaries only); when the two steps have
    different phase counts, the whole steps' peaks are extrapolated instead.
    """
    if count <= large.sequences:
        return large.peak
    spread = large.sequences - small.sequences
    pairs = list(zip(small.phases, large.phases)) if len(small.phases) == len(large.phases) else []
    pairs = pairs or [((small.peak, 0), (large.peak, 0))]
    more = count - large.sequences
    return int(max(b + max(0, b - a) / spread * more for (a, _), (b, _) in pairs))
