"""PEFT LoRA layers keep their input in the compute dtype while autocast runs: no float32 copy.

PEFT keeps the adapters' weights in float32 and, before each adapter, casts the layer's input to
that dtype (``LoraLayer._cast_input_dtype``). Under bf16/fp16 autocast, as TRL trains with
``bf16=True``/``fp16=True``, the adapter's ``nn.Linear`` then casts that copy straight back to the
autocast dtype. Both casts are exact, so the copies change no number, but they cost: a transient
float32 copy of the input and a second half-precision copy that autograd saves for the adapter's
backward beside the base layer's own. In the allocator's trace of an H200 run (Llama-shaped 1.1B,
r=16 on every linear layer, full checkpointing, a step of 11.9k tokens) the float32 copy of the
down projection's input (372 MiB) and the saved copies of one layer (about 470 MiB) were live at
the 4.68 GiB peak; without checkpointing every layer keeps its copies.

Here a LoRA layer's cast returns the input unchanged exactly when it would be undone at once:
a float32 target, an input in the autocast dtype of its device, autocast on. Anything else goes
to PEFT's own cast. Only plain ``peft.tuners.lora.layer.Linear`` layers whose adapters are all
vanilla LoRA without dropout are edited (dropout draws its mask per dtype; DoRA and other
variants use the input beyond the adapter's matmul); PEFT's quantised layers skip the cast under
autocast already. The edit is on the user's model instance, for the length of ``train()``.
"""

from __future__ import annotations

import types
from typing import Optional

LORA_LINEAR = ("peft.tuners.lora.layer", "Linear")  # where the class lives, and its name
_last: dict = {"edited": 0, "kept": {}, "reason": "not run yet"}


def last() -> dict:
    """What the most recent ``train()`` did to the LoRA layers (``edited``, ``kept``: name -> why, ``reason``)."""
    return {"edited": _last["edited"], "kept": dict(_last["kept"]), "reason": _last["reason"]}


def remember(outcome: dict) -> None:
    global _last
    _last = {"edited": outcome.get("edited", 0), "kept": dict(outcome.get("kept", {})), "reason": outcome["reason"]}


def autocast_state(device_type: str) -> tuple:
    """``(on, dtype)`` of autocast on ``device_type``; ``(None, None)`` when this torch or device cannot say."""
    import torch

    try:
        on = bool(torch.is_autocast_enabled(device_type))
        return on, (torch.get_autocast_dtype(device_type) if on else None)
    except (TypeError, RuntimeError):  # a torch or device without per-device autocast queries
        return None, None


def is_plain_lora_linear(module) -> bool:
    """Whether ``module`` is PEFT's plain LoRA ``Linear`` (not a quantised or other layer type)."""
    cls = type(module)
    return (cls.__module__, cls.__name__) == LORA_LINEAR


def _kept_input(self, x, dtype):
    """``LoraLayer._cast_input_dtype``, but the input is returned as it is when autocast would undo the cast."""
    import torch

    if isinstance(x, torch.Tensor) and dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16):
        on, autocast_dtype = autocast_state(x.device.type)
        if on and autocast_dtype == x.dtype:
            return x
    return type(self)._cast_input_dtype(self, x, dtype)


def layer_reason(module) -> Optional[str]:
    """Why this LoRA layer keeps PEFT's cast (None: it can take the edit). Reads the module only."""
    cls = type(module)
    if not is_plain_lora_linear(module):
        return f"{cls.__module__}.{cls.__name__} is not PEFT's plain LoRA Linear"
    if not callable(getattr(cls, "_cast_input_dtype", None)):
        return "this PEFT casts the input inline (no _cast_input_dtype)"
    if "_cast_input_dtype" in vars(module):
        return "its _cast_input_dtype is already replaced on the instance"
    return adapters_reason(module)


def adapters_reason(module) -> Optional[str]:
    """Why this LoRA layer's adapters may use their input beyond the plain ``lora_B(lora_A(x))`` (a variant,
    dropout), so that a copy of it can be kept; None when they are vanilla LoRA without dropout."""
    if getattr(module, "lora_variant", None):
        return "a LoRA variant (e.g. DoRA) uses the input beyond the adapter's matmul: left to PEFT"
    dropouts = getattr(module, "lora_dropout", None)
    if dropouts is None or not hasattr(dropouts, "values"):
        return "no lora_dropout modules to inspect"
    import torch

    if not all(isinstance(d, torch.nn.Identity) for d in dropouts.values()):
        return "lora_dropout > 0: dropout draws its mask per dtype, so the cast is kept"
    return None


def is_lora_layer(module) -> bool:
    """Whether ``module`` is a PEFT LoRA layer (adapters beside a base layer), of any type."""
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base_layer")


def keeps_input(module) -> bool:
    """Whether this edit is on ``module`` now: its adapters read the very tensor the base layer reads while
    autocast runs in that tensor's dtype (no dropout, no cast copy for autograd to save)."""
    return getattr(vars(module).get("_cast_input_dtype"), "__func__", None) is _kept_input


def keep_input_dtype(model, edits) -> dict:
    """Edit every eligible LoRA layer of ``model`` through ``edits``; ``{"edited": n, "kept": {name: why}}``."""
    edited, kept = 0, {}
    for name, module in model.named_modules():
        if not is_lora_layer(module):
            continue
        why = layer_reason(module)
        if why is not None:
            kept[name] = why
            continue
        edits.setattr(module, "_cast_input_dtype", types.MethodType(_kept_input, module))
        edited += 1
    reason = "edited" if edited else ("no eligible LoRA layer" if kept else "no LoRA layer")
    return {"edited": edited, "kept": kept, "reason": reason}
