"""Per batch, inside the chosen policy's budget: the fastest way to run this batch (a pure decision).

The probe sizes the checkpointing policy for the worst batch the data could make (the longest
sequences together), so that the run can never run out of memory. Padding-free batches are
mostly far smaller: the reference data's average 4.7k tokens a step against 16k at worst. A
small batch leaves room under the budget that the worst-case policy does not use. Before each
training step, from the batch's tokens and the probe's measured steps, the room is spent on
what saves the most host work per byte:

1. **the MLP chunk** grows towards the whole batch (``mlp_chunk``: each chunk costs its launches;
   one chunk costs a batch ``bytes_per_token`` per token over the probed chunk);
2. **a faster candidate** (``policy.PREFERENCE``) replaces the chosen one where its own measured
   steps predict this batch fits (e.g. ``mlp_recompute`` for ``offload``: no host copies), unless
   it would run the batch in more chunks than a slower one;
3. **the last layers run without checkpointing**, as many as the room left holds, each at what one
   layer's forward keeps, as full checkpointing's recomputations measured it (``estimate.recomputed_bytes``).

Each choice's prediction stays under the budget less ``MARGIN``, kept for the allocator: the
choices change the step's allocations from batch to batch. A batch where nothing fits under that
runs exactly as the run was planned (the chosen policy, the run's chunk, every layer checkpointed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from . import estimate
from .mlp_chunk import CHUNKED_POLICIES, ROUND
from .policy import PREFERENCE, gib

MARGIN = 0.08  # of the budget, left free by every per-batch choice (the worst batch's plan may use it)
ANCHOR = "full"  # whose recomputed layers measure one layer's activations


@dataclass
class Facts:
    """What the per-batch choice is made from, fixed for one ``train()``."""

    chosen: str  # the run's policy (for the worst batch)
    steps: dict  # candidate -> its measured steps (estimate.Step, smallest first): the chosen one and faster ones
    longest: int  # tokens of a probe sequence: a batch of T tokens is T / longest sequence-equivalents
    budget: int
    extra: int  # the later extra (optimizer state), on top of every step's peak
    chunk: int = 0  # the run's MLP chunk in tokens (0: the MLPs do not run chunked)
    probed_chunk: int = 0  # the chunk the probe's steps ran with
    chunk_bytes_per_token: int = 0
    layers: int = 0  # checkpointed layers (0: a layer's activations are not known, none run unchecked)
    layer_bytes: float = 0.0  # what one layer's forward keeps for its backward, per sequence-equivalent
    reason: str = ""
    seen: dict = field(default_factory=dict)  # after train(): what the steps chose (``Tally.as_dict``)

    @property
    def limit(self) -> int:
        return int(self.budget * (1 - MARGIN))


@dataclass(frozen=True)
class Choice:
    """How one batch runs: its policy, MLP chunk, layers without checkpointing, and the predicted peak."""

    policy: str
    chunk: int  # tokens per MLP chunk (0: the policy's MLPs do not run chunked)
    unchecked: int  # the last this many layers run without checkpointing
    predicted: int  # bytes: the batch's peak plus the later extra
    planned: bool = False  # nothing fitted under the margin: the run's own plan


def facts(chosen: Optional[str], steps: dict, longest: int, budget: Optional[int], extra: int, chunk=None,
          off: Optional[str] = None):
    """``(Facts or None, why)``: what a run under ``chosen`` can adapt per batch from the probe's ``steps``
    (candidate -> measured steps); ``chunk``: the run's ``mlp_chunk.Chunk``; ``off``: why not at all."""
    if off:
        return None, off
    if chosen is None or chosen == ANCHOR:
        return None, "every batch runs TRL's full checkpointing (the policy is not installed by the plugin)"
    if chosen == "none":
        return None, "nothing is checkpointed: no batch can run faster"
    if not steps.get(chosen) or not longest or budget is None:
        return None, "the chosen policy has no measured steps to predict batches from"
    faster = PREFERENCE[: PREFERENCE.index(chosen) + 1]
    kept = {name: tuple(steps[name]) for name in faster if steps.get(name)}
    layers = estimate.recomputed_bytes(steps.get(ANCHOR, ()))
    chunked = chunk is not None and chunk.bytes_per_token > 0
    result = Facts(chosen, kept, int(longest), int(budget), int(extra),
                   chunk=int(chunk.tokens) if chunked else 0, probed_chunk=int(chunk.probed) if chunked else 0,
                   chunk_bytes_per_token=int(chunk.bytes_per_token) if chunked else 0,
                   layers=int(layers[0]) if layers else 0, layer_bytes=float(layers[1]) if layers else 0.0)
    parts = [f"per batch under {gib(result.limit)} ({1 - MARGIN:.0%} of the budget)"]
    if result.chunk:
        parts.append("MLP chunks up to the whole batch")
    if len(kept) > 1:
        parts.append("faster candidates where measured to fit: " + ", ".join(n for n in kept if n != chosen))
    parts.append(f"up to {result.layers} layers without checkpointing" if result.layers
                 else "no layer left unchecked (one layer's activations not measured)")
    result.reason = "; ".join(parts)
    return result, ""


def _chunk_cost(f: Facts, chunk: int, tokens: int) -> int:
    return max(0, min(chunk, tokens) - min(f.probed_chunk, tokens)) * f.chunk_bytes_per_token


def _largest_chunk(f: Facts, room: int, tokens: int) -> int:
    """The largest chunk (a multiple of ``ROUND``, or one covering the batch) whose cost fits ``room``;
    at least the probed chunk, which costs nothing."""
    if f.chunk_bytes_per_token <= 0 or room <= 0:
        return f.probed_chunk
    grow = room // f.chunk_bytes_per_token
    if f.probed_chunk + grow >= tokens:
        return max(f.probed_chunk, -(-tokens // ROUND) * ROUND)  # one chunk covers the batch
    return max(f.probed_chunk, (f.probed_chunk + grow) // ROUND * ROUND)


def choose(f: Facts, tokens: int) -> Choice:
    """The choice for a batch of ``tokens`` tokens (flat, or padded rows times their length): among the
    candidates whose measured steps predict the batch fits under the margin, the one that runs it in the
    fewest MLP chunks, the faster of those; then as many unchecked layers as the room left holds."""
    count = tokens / f.longest
    limit = f.limit
    best = None
    for rank, name in enumerate(f.steps):  # fastest first, the chosen one last
        base = estimate.peak_at(f.steps[name], count)
        if base is None or base + f.extra > limit:
            continue
        base += f.extra
        chunk, cost = 0, 0
        if name in CHUNKED_POLICIES and f.chunk:
            chunk = max(_largest_chunk(f, limit - base, tokens), f.chunk if name == f.chosen else 0)
            cost = _chunk_cost(f, chunk, tokens)
            if base + cost > limit:  # the run's own chunk over the margin
                continue
        chunks = -(-tokens // chunk) if chunk else 1
        if best is None or (chunks, rank) < best[0]:
            best = ((chunks, rank), name, base + cost, chunk)
    if best is None:
        return planned(f, tokens)
    _, name, held, chunk = best
    unchecked = 0
    per_layer = f.layer_bytes * count
    if f.layers and per_layer > 0 and name != "none":
        unchecked = min(f.layers, int((limit - held) // per_layer))
    return Choice(name, chunk, unchecked, int(held + unchecked * per_layer))


def planned(f: Facts, tokens: int) -> Choice:
    """The run's own plan for a batch: the chosen policy and chunk, every layer checkpointed."""
    base = estimate.peak_at(f.steps[f.chosen], tokens / f.longest) or 0
    chunk = f.chunk if f.chosen in CHUNKED_POLICIES else 0
    cost = _chunk_cost(f, chunk, tokens) if chunk else 0
    return Choice(f.chosen, chunk, 0, int(base + f.extra + cost), planned=True)


class Tally:
    """What a run's steps chose: counts per policy, per layers left unchecked, per chunk; the largest prediction."""

    def __init__(self):
        self.policies: dict = {}
        self.unchecked: dict = {}
        self.chunks: dict = {}
        self.planned = 0
        self.predicted = 0

    def note(self, choice: Choice) -> None:
        self.policies[choice.policy] = self.policies.get(choice.policy, 0) + 1
        self.unchecked[choice.unchecked] = self.unchecked.get(choice.unchecked, 0) + 1
        if choice.chunk:
            self.chunks[choice.chunk] = self.chunks.get(choice.chunk, 0) + 1
        self.planned += int(choice.planned)
        self.predicted = max(self.predicted, choice.predicted)

    def as_dict(self) -> dict:
        return {"steps": sum(self.policies.values()), "policies": dict(self.policies),
                "unchecked_layers": {str(k): v for k, v in sorted(self.unchecked.items())},
                "chunks": {str(k): v for k, v in sorted(self.chunks.items())}, "as_planned": self.planned,
                "predicted_max_bytes": self.predicted}
