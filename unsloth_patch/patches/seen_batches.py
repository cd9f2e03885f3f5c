"""The largest batch a ``train()`` really draws, and the memory model's peak for it.

The probe sizes the worst batch the data could make (the longest sequences together) so that the
chosen policy can never run out of memory; a run's batches are usually smaller, so that worst-case
figure says little about how good the memory model is. While ``train()`` runs, each training step's
batch size is noted (its tokens, padded or flat: host metadata, no device sync); when it returns,
the chosen candidate's measured steps give the peak at the largest batch seen
(``estimate.peak_at``), plus the later extra and what chunks larger than the probed ones add
(``mlp_chunk``), in the decision (``seen_sequences``,
``predicted_seen_bytes``) -- the figure to hold against the run's measured peak. Only where the probe
measured the chosen policy.
"""

from __future__ import annotations

from typing import Optional

from .. import checkpointing as policy
from .. import log
from ..edits import Edits


def batch_tokens(inputs) -> int:
    """A training batch's tokens, flat or padded rows times their length (host metadata, no device sync); 0 when
    it has no ``input_ids``."""
    ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
    return int(ids.numel()) if ids is not None and hasattr(ids, "numel") else 0


class _Largest:
    def __init__(self):
        self.tokens = 0


def watch(trainer, decision, edits: Edits) -> Optional[_Largest]:
    """Note each training batch's tokens for this ``train()`` (the wrapper goes with ``edits``); None when
    the decision has no measured steps to predict from."""
    if not decision.chosen_steps or not decision.longest:
        return None
    largest = _Largest()
    step = trainer.training_step

    def noting_step(model, inputs, *args, **kwargs):
        largest.tokens = max(largest.tokens, batch_tokens(inputs))
        return step(model, inputs, *args, **kwargs)

    edits.setattr(trainer, "training_step", noting_step)
    return largest


def settle(decision, largest: Optional[_Largest]) -> None:
    """After ``train()``: the model's peak at the largest batch seen, plus the later extra, in ``decision``."""
    if largest is None or not largest.tokens:
        return
    try:
        decision.seen_sequences = largest.tokens / decision.longest
        peak = policy.peak_at(decision.chosen_steps, decision.seen_sequences)
        chunk = decision.mlp_chunk.extra_at(largest.tokens) if decision.mlp_chunk is not None else 0
        decision.predicted_seen_bytes = None if peak is None else peak + decision.extra_bytes + chunk
    except Exception as exc:  # a report only: never the user's run
        log.logger.debug("no prediction for the batches seen: %s", exc)
