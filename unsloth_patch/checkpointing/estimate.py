"""The memory model: a step's peak from smaller steps' phases (pure arithmetic, no torch).

A step's live memory is, phase by phase (see ``meter``), a part that does not grow with the
number of sequences (weights, buffers, the gradients already allocated, fixed-size workspaces)
plus a part that grows with each further sequence of the same length (activations, attention,
rows of logits). Which phase holds the peak can change with the batch size: with few sequences a
backward phase (gradients, a recomputed layer) may dominate, with more a forward phase whose
activations grow faster (a chunked loss head's logits, say). So the peak is predicted per phase
and the largest prediction is the step's.

The probe also predicts each of its steps before running it (``ladder``): from the candidate's own
smaller steps (``own``), or, for the first step of a candidate that keeps every layer's activations,
from full checkpointing's steps, in which each layer's activations appear once, when the layer is
recomputed for its backward (``layer_bytes``, ``kept``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

STEP_SIZES = (1, 2, 4)  # sequences of the probe's steps, smallest first


@dataclass(frozen=True)
class Step:
    """One measured step: ``sequences`` copies of the longest sequence (or the batch itself)."""

    sequences: int
    baseline: int  # bytes held before the step, less its batch (parameters, buffers, existing gradients)
    phases: tuple  # (peak bytes, gradient bytes present when the phase began) per phase, in order
    starts: tuple = ()  # bytes held when each phase began (empty: not recorded)
    kinds: tuple = ()  # what began each phase: "recompute" is a layer entered again during the backward
    end_grads: int = 0  # gradient bytes when the step ended
    # wall seconds of its parts (``probe.measure``): preparing (restore point, hooks, batch), the step itself
    # (synchronised on CUDA), putting the model back and freeing what it left; empty when not timed
    seconds: tuple = ()

    @property
    def peak(self) -> int:
        return max((p[0] for p in self.phases), default=self.baseline)


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
    more = count - large.sequences
    return int(max(b + max(0, b - a) / spread * more for a, b in _phase_peaks(small, large)))


def _phase_peaks(small: Step, large: Step) -> list:
    """``(small's peak, large's peak)`` per phase, matched by position; the whole steps' peaks when the two
    steps have different phase counts."""
    pairs = list(zip(small.phases, large.phases)) if len(small.phases) == len(large.phases) else []
    return [(a[0], b[0]) for a, b in pairs] or [(small.peak, large.peak)]


def from_one(step: Step, count: int) -> int:
    """The peak of ``count`` sequences from a single step: per phase, the baseline and the gradients
    present when the phase ended do not grow, the rest grows in proportion to the sequences."""
    if count <= step.sequences or not step.phases:
        return step.peak
    return _scaled(step, count)


def _scaled(step: Step, count: float) -> int:
    ends = [p[1] for p in step.phases[1:]] + [step.end_grads]
    best = step.baseline
    for (peak, grads, *_), end in zip(step.phases, ends):
        fixed = min(peak, step.baseline + max(grads, end))
        best = max(best, fixed + (peak - fixed) * count / step.sequences)
    return int(best)


def own(steps: Sequence[Step], count: int) -> Optional[int]:
    """A candidate's peak at ``count`` sequences from its own steps (smallest first): the step of that
    size as measured; else the two largest smaller ones extrapolated (one: ``from_one``); else the
    smallest larger step's peak. None without steps."""
    for step in steps:
        if step.sequences == count:
            return step.peak
    smaller = [s for s in steps if s.sequences < count]
    if len(smaller) >= 2:
        return extrapolate(smaller[-2], smaller[-1], count)
    if smaller:
        return from_one(smaller[0], count)
    return min((s.peak for s in steps), default=None)


def layer_bytes(steps: Sequence[Step]):
    """``(layers, bytes per sequence)`` of one layer's activations, from full checkpointing's steps.

    Each phase that a recomputed layer begins rises by that layer's activations (rebuilt for its
    backward) and the gradients it allocates, less what its backward frees as it goes. From two
    steps, the largest rise's growth per sequence (the gradients, which do not grow, drop out);
    from one, the largest rise per sequence (gradients included: more, the safe side). None when no
    layer was recomputed.
    """
    return _per_layer(steps, _rises)


def recomputed_bytes(steps: Sequence[Step]):
    """``(layers, bytes per sequence)`` of what one layer's forward keeps for its backward, from full
    checkpointing's steps: the rise of each recomputation alone, without the layer's backward that follows
    (where the probe marked its end, ``"recomputed"``; else as ``layer_bytes``). What a layer run without
    checkpointing holds on top of a checkpointed step. None when no layer was recomputed."""
    return _per_layer(steps, _forward_rises)


def _rises(step: Step) -> list:
    """Per recomputed layer: its recomputation's and its backward's highest point over where it began."""
    out = []
    for i, (phase, start, kind) in enumerate(zip(step.phases, step.starts, step.kinds)):
        if kind == "recompute":
            top = phase[0]
            if i + 1 < len(step.kinds) and step.kinds[i + 1] == "recomputed":
                top = max(top, step.phases[i + 1][0])
            out.append(top - start)
    return out


def _forward_rises(step: Step) -> list:
    return [p[0] - start for p, start, kind in zip(step.phases, step.starts, step.kinds) if kind == "recompute"]


def _per_layer(steps: Sequence[Step], rises):
    if not steps:
        return None
    last = rises(steps[-1])
    if not last:
        return None
    if len(steps) >= 2:
        first = rises(steps[-2])
        spread = steps[-1].sequences - steps[-2].sequences
        if len(first) == len(last) and spread > 0:
            return len(last), max(max(0, b - a) for a, b in zip(first, last)) / spread
    return len(last), max(0, max(last)) / steps[-1].sequences


def kept(anchor: Sequence[Step], count: int) -> Optional[int]:
    """The peak of ``count`` sequences with every layer's activations kept (no checkpointing), from full
    checkpointing's steps ``anchor``: full's peak there plus every layer's activations. It errs high
    (full's peak already holds one recomputed layer and the saved layer inputs). None when
    ``layer_bytes`` cannot tell."""
    layers, base = layer_bytes(anchor), own(anchor, count)
    if layers is None or base is None:
        return None
    count_layers, per_sequence = layers
    return int(base + count_layers * per_sequence * count)


def step_sizes(count: int) -> tuple:
    """The probe's steps for a batch of ``count`` sequences: 1, 2, then 4 sequences; a batch of up to
    four sequences is measured as it is, as the last step."""
    return tuple(n for n in STEP_SIZES if n < count) + ((count,) if count <= STEP_SIZES[-1] else ())


def batch_peak(steps: Sequence[Step], count: int) -> int:
    """The peak of the batch of ``count`` sequences from the steps of ``step_sizes(count)``: the batch's
    own step when it was measured, else the last two steps extrapolated phase by phase."""
    if steps[-1].sequences >= count or len(steps) < 2:
        return steps[-1].peak if steps[-1].sequences >= count else from_one(steps[-1], count)
    return extrapolate(steps[-2], steps[-1], count)


def peak_at(steps: Sequence[Step], count: float) -> Optional[int]:
    """The peak at ``count`` sequence-equivalents (a batch's tokens over the probe's sequence length; any
    positive number) from a candidate's measured steps (smallest first): a measured size as measured,
    between two steps the straight line through them (phase by phase where their phases match), above
    the largest the last two extrapolated (one: ``from_one``), below the smallest that step's peak (a
    smaller batch holds no more). What the run's own largest batch should hold, where ``batch_peak``
    sizes the worst batch the data could make. None without steps."""
    larger = [s for s in steps if s.sequences > count]
    smaller = [s for s in steps if s.sequences < count]
    if not (larger and smaller) or any(s.sequences == count for s in steps):
        return own(steps, count)  # measured, above the largest step, or below the smallest (its peak)
    low, high = smaller[-1], larger[0]
    share = (count - low.sequences) / (high.sequences - low.sequences)
    return int(max(a + (b - a) * share for a, b in _phase_peaks(low, high)))
