"""The shape of one training step, read from a built trainer, for the memory bound (``checkpointing.bound``).

Facts only: sizes from the model's config, the attention implementation it trains with, what the
device already holds. The bound itself, and whether it fits, are decided elsewhere.
"""

from __future__ import annotations

import math

from .. import checkpointing as policy
from .trainer_facts import base_model

_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def step_shape(trainer, spec, mixed) -> "policy.StepShape | None":
    """``StepShape`` of ``trainer``'s largest batch ``spec`` under autocast ``mixed`` (None: sizes unknown)."""
    import torch

    model = trainer.model
    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def size(name, default=0):
        value = getattr(text, name, None)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    hidden, heads = size("hidden_size"), size("num_attention_heads")
    if not (hidden and heads):
        return None
    parameters = list(model.parameters())
    device = parameters[0].device if parameters else torch.device("cpu")
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
    else:
        resident = sum(t.numel() * t.element_size() for t in [*parameters, *model.buffers()])
    trainable = sum(p.numel() * p.element_size() for p in parameters if p.requires_grad)
    activation = activation_bytes(parameters, mixed)
    lora = hasattr(model, "peft_config")
    lora_layers = _lora_layers(model) if lora else []
    quantized = bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                     or getattr(config, "quantization_config", None) is not None
                     or any(not p.is_floating_point() for p in parameters))
    four_bit = [p for p in parameters if _is_4bit(p)]
    packed_others = [p for p in parameters if not p.is_floating_point() and not _is_4bit(p)]
    only_4bit = bool(four_bit) and not packed_others and not getattr(base, "is_loaded_in_8bit", False)
    # a projection's (or a fused group's) dense weights live while it runs, forward or backward: twice the
    # eight largest (a decoder layer has seven projections) stay above what can be live at once
    dense = sorted(_dense_numel(p) for p in four_bit)
    dequant = 2 * sum(dense[-8:]) * activation
    dequant += sum(_kept_scales(p) for p in four_bit)  # the double-quantised scales, dequantised once and kept
    return policy.StepShape(
        model_type=str(getattr(text, "model_type", "") or getattr(config, "model_type", "")),
        attention=str(getattr(config, "_attn_implementation", None) or getattr(text, "_attn_implementation", "")),
        layers=size("num_hidden_layers"),
        hidden=hidden,
        intermediate=size("intermediate_size"),
        heads=heads,
        kv_heads=size("num_key_value_heads", heads),
        head_dim=size("head_dim", hidden // heads),
        vocab=size("vocab_size"),
        tokens=sum(spec.lengths),
        activation_bytes=activation,
        resident_bytes=resident,
        gradient_bytes=trainable,
        lora=lora,
        lora_input_copies=lora and not _adapters_read_base_inputs(model, lora_layers, mixed),
        lora_rank_bytes=_low_rank_bytes(lora_layers, activation),
        quantized=quantized,
        quantization="4bit" if quantized and only_4bit else ("other" if quantized else ""),
        dequant_bytes=dequant if only_4bit else 0,
        dense_4bit_bytes=sum(dense) * activation if only_4bit else 0,
        experts=max(size(name) for name in _EXPERT_FIELDS),
    )


def activation_bytes(parameters, mixed) -> int:
    """Bytes per element of the step's activations: 2 under bf16/fp16 autocast, else the model's first floating
    parameter's (4 without one)."""
    if mixed in ("bf16", "fp16"):
        return 2
    floating = next((p for p in parameters if p.is_floating_point()), None)
    return floating.element_size() if floating is not None else 4


def _is_4bit(parameter) -> bool:
    """A bitsandbytes 4-bit weight (``Params4bit``: packed, with the quant state it dequantises by)."""
    return type(parameter).__name__ == "Params4bit" and getattr(parameter, "quant_state", None) is not None


def _dense_numel(parameter) -> int:
    shape = getattr(parameter.quant_state, "shape", None)
    if shape is not None:
        return math.prod(int(size) for size in shape)
    return 2 * parameter.numel()  # two 4-bit values a byte


def _kept_scales(parameter) -> int:
    from ..kernels.projection import absmax_cache_bytes

    return absmax_cache_bytes(_dense_numel(parameter), parameter.quant_state)


def _compute_dtype(layer):
    """The dtype a LoRA layer's base computes in: its weight's, or for a 4-bit weight the one it dequantises to."""
    weight = getattr(layer.base_layer, "weight", None)
    if weight is not None and _is_4bit(weight):
        return getattr(weight.quant_state, "dtype", None)
    return getattr(weight, "dtype", None)


def _lora_layers(model) -> list:
    from ..lora_inputs import is_lora_layer

    return [m for m in model.modules() if is_lora_layer(m)]


def _adapters_read_base_inputs(model, layers, mixed) -> bool:
    """Whether, under autocast, every LoRA layer's adapters read the very tensor its base layer reads, so
    that they keep no copy of it: this ``train()``'s ``lora_inputs`` edit is on every plain LoRA layer
    (which implies no dropout), PEFT's 4-bit layers (which skip the cast under autocast) have no dropout
    and no variant, and the model computes in the autocast dtype already (its embeddings and base weights
    in it, a 4-bit weight dequantising to it), so autocast casts no input either. Anything else (dropout,
    DoRA, the edit turned off, no autocast, float32 weights under autocast) counts the copies."""
    import torch

    from ..lora_inputs import keeps_input

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    if dtype is None or not layers:
        return False
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(getattr(embeddings, "weight", None), "dtype", None) != dtype:
        return False
    return all(_compute_dtype(m) == dtype and (keeps_input(m) or _plain_4bit_layer(m)) for m in layers)


def _plain_4bit_layer(layer) -> bool:
    """PEFT's LoRA layer on a bitsandbytes 4-bit base, vanilla adapters without dropout: under autocast it
    hands the input to the adapters as it is (PEFT converts it only without autocast)."""
    from ..lora_inputs import adapters_reason

    weight = getattr(layer.base_layer, "weight", None)
    return weight is not None and _is_4bit(weight) and adapters_reason(layer) is None


def _low_rank_bytes(layers, activation: int) -> int:
    """Per token: the adapters' low-rank activations (``x @ A.T``) of the LoRA layers' active adapters."""
    total = 0
    for module in layers:
        ranks = getattr(module, "r", None)
        active = getattr(module, "active_adapters", None) or ()
        if isinstance(active, str):
            active = (active,)
        if isinstance(ranks, dict):
            total += sum(int(ranks.get(name, 0)) for name in active)
    return total * max(activation, 4)  # float32 adapters may keep it in float32
