"""Each training step's batch chooses how it runs inside the chosen policy's budget (``checkpointing/per_batch.py``).

Before each ``training_step``, the batch's tokens (host metadata, no device sync) give the choice:
the layers' checkpoint function (``checkpointing.PerBatch``) is told the batch's policy and which
layers run unchecked, and the chunked MLPs their chunk. Everything goes through ``edits``: when
``train()`` returns the model has the run's policy and chunk again. A choice that fails is
warned about once, and the run goes on as planned (the chosen policy, its chunk, every layer
checkpointed).
"""

from __future__ import annotations

import logging
from typing import Optional

from .. import checkpointing as policy
from .. import log, mlp_recompute
from ..checkpointing import per_batch
from ..edits import Edits
from .seen_batches import batch_tokens


def start(trainer, decision, kwargs: dict, edits: Edits) -> Optional[per_batch.Tally]:
    """Let each batch of this ``train()`` choose (the wrappers go with ``edits``); None when the decision
    has nothing to choose from."""
    facts = decision.per_batch
    if facts is None:
        return None
    model = trainer.model
    functions = {name: policy.checkpoint_function(name, kwargs) for name in facts.steps}
    dispatcher = policy.PerBatch(functions, facts.chosen)
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            edits.setattr(module, "_gradient_checkpointing_func", dispatcher)
    layers = policy.blocks(model)
    mlps = mlp_recompute.marked(model) if facts.chunk else []
    for mlp in mlps:  # the run's chunk, recorded so that the per-batch chunks are undone with the rest
        edits.setattr(mlp, mlp_recompute.CHUNK, getattr(mlp, mlp_recompute.CHUNK, None) or facts.chunk)
    tally = per_batch.Tally()
    state = {"chunk": None, "on": True}
    step = trainer.training_step

    def choose(tokens: int) -> None:
        choice = per_batch.choose(facts, tokens)
        unchecked = layers[len(layers) - choice.unchecked:] if 0 < choice.unchecked <= len(layers) else ()
        dispatcher.set(choice.policy, (id(layer) for layer in unchecked))
        if choice.chunk and choice.chunk != state["chunk"]:
            for mlp in mlps:
                setattr(mlp, mlp_recompute.CHUNK, choice.chunk)
            state["chunk"] = choice.chunk
        tally.note(choice)

    def per_batch_step(model_, inputs, *args, **kw):
        tokens = batch_tokens(inputs)
        if tokens and state["on"]:
            try:
                choose(tokens)
            except Exception as exc:  # the plan is always safe: go back to it for the rest of the run
                state["on"] = False
                dispatcher.set(facts.chosen)
                for mlp in mlps:
                    setattr(mlp, mlp_recompute.CHUNK, facts.chunk)
                log.once(("per-batch", type(exc).__name__), logging.WARNING,
                         "per-batch checkpointing choice failed (%s: %s); every batch runs as planned",
                         type(exc).__name__, exc)
        return step(model_, inputs, *args, **kw)

    edits.setattr(trainer, "training_step", per_batch_step)
    return tally


def settle(decision, tally: Optional[per_batch.Tally]) -> None:
    """After ``train()``: what the batches chose, and the largest prediction among them as the run's predicted peak."""
    if tally is None or decision.per_batch is None:
        return
    decision.per_batch.seen = tally.as_dict()
    if tally.predicted:
        decision.predicted_seen_bytes = tally.predicted
