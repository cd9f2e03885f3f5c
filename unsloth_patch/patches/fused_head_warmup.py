"""TRL's fused LM head (TRL >= 1.15): its Triton kernels compile beside ours, before the first step.

``SFTTrainer.__init__`` gives the model TRL's fused LM head (``add_fused_lm_head``): per-token
log-probabilities, entropy and top-1 hits folded from cuBLAS tiles of ``hidden @ weight.T`` by two
Triton kernels (forward and backward). On a cold cache they compile at the first training step, one
after the other, on the main thread (about 0.5 s on an H200). When our kernel warm-up is running,
this wrapper launches TRL's own function once on a few tokens with the run's vocabulary, chunk size,
flags and compute dtype — the same specialisations as the real call, so the first step finds them
compiled. TRL's behaviour is unchanged: the head is added exactly as TRL adds it, and the launch
touches neither the model nor its gradients (its inputs are made up, of width 16).

``SFTTrainer`` adds the head at the end of its ``__init__``, just before ``train()`` would wait for it,
so a half-precision model built in a script that imported ``SFTTrainer`` has it warmed already then
(``start_early``, from ``model_warmup``), with the arguments SFTTrainer passes (``SFT_TRAINER_CALL``);
the trainer's own call begins nothing when it asks for the same kernels (``warmup.start_task``'s key).
"""

from __future__ import annotations

import contextlib
import inspect

from .. import log, warmup

TOKENS = 4  # made-up rows of the launch
WIDTH = 16  # made-up hidden size: the projection is cuBLAS's; the Triton kernels see only the tiles


# how SFTTrainer (TRL 1.15+) calls ``add_fused_lm_head``: what a model built for it is warmed with (``start_early``)
SFT_TRAINER_CALL = dict(temperature=1.0, cast_fp32=False, outputs=("log_probs", "entropy", "is_top1"))


def handle_add_fused_lm_head(proceed, instance, args, kwargs):
    result = proceed(*args, **kwargs)
    try:
        from trl.trainer import utils as trl_utils

        call = _arguments(trl_utils.add_fused_lm_head, args, kwargs)  # TRL's own function: its signature
        if call is not None:
            _start(call)
    except Exception as exc:  # the first step compiles them, as without us
        log.logger.debug("TRL fused LM head warm-up not started: %s", exc)
    return result


def start_early(model) -> bool:
    """At the model's construction (``model_warmup``): begin compiling TRL's fused LM head as SFTTrainer will
    call it, before the trainer exists. When the trainer's call differs, its own start compiles that one."""
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return False  # a backbone without its head (the inner model of a ``*ForCausalLM``)
    return _start(dict(model=model, **SFT_TRAINER_CALL))


def _start(call) -> bool:
    return warmup.start_task("TRL fused LM head", lambda device, dtype: launch(device=device, compute_dtype=dtype,
                                                                               **call), key=_key(call))


def _key(call):
    """What TRL's kernels specialise on in a call: the head's rows and dtype, the softcap and the flags."""
    model = call["model"]
    weight = model.get_output_embeddings().weight
    return (int(weight.shape[0]), str(weight.dtype), _softcap(model), call["temperature"], call["cast_fp32"],
            tuple(call["outputs"]))


def _softcap(model):
    """The final logits' soft-capping of ``model``'s text config (None: none)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(text, "final_logit_softcapping", None)


def _arguments(function, args, kwargs):
    """model, temperature, cast_lm_head_to_fp32 and outputs of TRL's call (None if it cannot be read)."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    values = bound.arguments
    model = values.get("model")
    if model is None or not hasattr(model, "get_output_embeddings") or "outputs" not in values:
        return None
    return dict(model=model, temperature=float(values.get("temperature", 1.0)),
                cast_fp32=bool(values.get("cast_lm_head_to_fp32", False)), outputs=tuple(values["outputs"]))


def launch(model, temperature, cast_fp32, outputs, device, compute_dtype):
    """TRL's chunked log-prob function, forward and backward, as its fused forward calls it in training."""
    import torch
    from trl.trainer import utils as trl_utils

    from ..kernels.warmup import normal, own_generator

    function = trl_utils._ChunkedLogProbFunction
    chunk_size = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    softcap = _softcap(model)
    gen = own_generator(device)  # never the user's random streams (LoRA init, dropout)
    weight = normal(gen, vocab, WIDTH, device=device, dtype=head.weight.dtype)
    hidden = normal(gen, TOKENS, WIDTH, device=device, dtype=torch.float32 if cast_fp32 else compute_dtype)
    hidden.requires_grad_()
    targets = torch.randint(0, vocab, (TOKENS,), device=device, generator=gen)
    # the trainer's mixed precision runs the head under autocast; TRL's fp32 head turns it off
    autocast = (torch.autocast(device.type, dtype=compute_dtype)
                if not cast_fp32 and compute_dtype in (torch.bfloat16, torch.float16) else contextlib.nullcontext())
    with autocast:
        per_token = function.apply(hidden, weight, None, targets, temperature, chunk_size, softcap, 1.0, outputs)
    per_token[0].sum().backward()  # the loss's gradient only, as in training (entropy is logged detached)
