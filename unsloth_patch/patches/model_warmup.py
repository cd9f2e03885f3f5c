"""``PreTrainedModel.post_init``: begin compiling our kernels as soon as a model to train is built.

Building a model (loading its weights, quantising, moving it to the GPU) and the dataset work
after it take seconds of the script's own; compiling the kernels on threads meanwhile leaves
``train()`` less to wait for. Only in a script that imported TRL (a model built to be trained),
and only for a bf16 or fp16 model, whose compute dtype is its own (``warmup.start`` without
arguments); a float32 model is warmed at ``SFTTrainer(...)``. TRL's fused LM head (TRL >= 1.15) is
warmed too, as ``SFTTrainer`` will add it. The model is not touched: the config, the head's shape and a
parameter's dtype are read, nothing else.
"""

from __future__ import annotations

import sys

from .. import log, registry, warmup
from ..settings import current
from . import fused_head_warmup


def handle_post_init(proceed, instance, args, kwargs):
    result = proceed(*args, **kwargs)
    if "trl" in sys.modules:
        try:
            warmup.start(instance, None, current(), where="at model construction")
            if "fused_head_warmup" in registry.applied_names():  # TRL >= 1.15, its SFTTrainer imported
                fused_head_warmup.start_early(instance)
        except Exception as exc:  # SFTTrainer(...) begins them as it would have
            log.logger.debug("kernel warm-up at model construction not started: %s", exc)
    return result
