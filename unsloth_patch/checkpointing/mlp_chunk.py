"""How many tokens a chunked MLP computes at once, from the room the chosen policy leaves: a pure decision.

Under ``mlp_recompute`` and ``offload`` each gated MLP runs in token chunks (``kernels/chunked_mlp.py``):
one chunk's three intermediate-wide tensors are live at a time. The probe measures the policies with
the default chunk (``kernels.chunked_mlp.CHUNK_TOKENS``, passed in as ``probed``); every chunk costs its launches (three projections, each with its adapter,
forward, recomputed and backward) whatever its size, so on a small step the host's launch work, not
the card, sets the pace. Where the chosen policy's predicted peak leaves room under the budget, the
chunks grow into a share of that room: the worst batch then holds at most
``(tokens - probed) * bytes_per_token`` more than predicted, and the rest of the room stays
free. A batch of ``T`` tokens holds ``extra_at(T)`` more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .policy import gib

SHARE = 0.5  # of the room under the budget, the most the larger chunks may take
ROUND = 256  # chunk sizes are multiples of this many tokens
CHUNKED_POLICIES = ("mlp_recompute", "offload")  # the policies whose MLPs run chunked


@dataclass(frozen=True)
class Chunk:
    """A chosen chunk size, its worst-batch cost over the probed chunk, and why."""

    tokens: int
    extra_bytes: int
    reason: str
    probed: int
    bytes_per_token: int = 0

    @property
    def changed(self) -> bool:
        return self.tokens != self.probed

    def extra_at(self, batch_tokens: int) -> int:
        """Bytes a batch of ``batch_tokens`` tokens holds over what the probed chunk would make it hold."""
        return max(0, min(self.tokens, batch_tokens) - min(self.probed, batch_tokens)) * self.bytes_per_token


def as_probed(policy: str, probed: int, why: str) -> Optional[Chunk]:
    """The probed chunk kept for ``policy``, for the reason ``why`` (None when its MLPs do not run chunked)."""
    return _keep(Chunk(probed, 0, "", probed), why) if policy in CHUNKED_POLICIES else None


def choose(policy: str, budget: Optional[int], peak: Optional[int], extra: int, bytes_per_token: int,
           batch_tokens: int, probed: int) -> Optional[Chunk]:
    """The chunk for ``policy`` (None when its MLPs do not run chunked). ``peak``: the policy's predicted peak
    at the worst batch of ``batch_tokens`` tokens, measured with chunks of ``probed`` tokens; ``extra``: the
    later extra (optimizer state)."""
    if policy not in CHUNKED_POLICIES:
        return None
    if probed < 1:
        raise ValueError(f"probed must be the probe's positive chunk size in tokens, got {probed}")
    kept = Chunk(probed, 0, "", probed, bytes_per_token)
    if bytes_per_token <= 0:
        return _keep(kept, "the MLP's intermediate size is not known")
    if budget is None or peak is None:
        return _keep(kept, "no measured peak to size larger chunks from")
    if batch_tokens <= probed:
        return _keep(kept, f"no batch exceeds one chunk ({batch_tokens} tokens at most)")
    room = budget - peak - extra
    grow = int(room * SHARE) // bytes_per_token // ROUND * ROUND if room > 0 else 0
    tokens = min(probed + grow, batch_tokens)
    if tokens <= probed:
        return _keep(kept, f"{gib(max(room, 0))} left under the budget is too little for a larger chunk")
    cost = (tokens - probed) * bytes_per_token
    whole = " (the whole batch)" if tokens == batch_tokens else ""
    return Chunk(tokens, cost, f"{tokens}-token MLP chunks{whole}: at most {gib(cost)} over the probed "
                               f"{probed}-token chunks, within {SHARE:.0%} of the {gib(room)} left under the budget",
                 probed, bytes_per_token)


def _keep(kept: Chunk, why: str) -> Chunk:
    return Chunk(kept.tokens, 0, f"{kept.tokens}-token MLP chunks, as probed: {why}", kept.probed,
                 kept.bytes_per_token)
