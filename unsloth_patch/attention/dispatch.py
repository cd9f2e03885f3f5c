"""The attention function transformers calls for models switched to ``unsloth_varlen``.

It takes exactly the calls it can compute as the model would: no padding mask, query length
equal to key length (no KV cache to attend to), no attention feature it does not implement.
Sequence boundaries come from the collator's ``cu_seq_lens_*``/``max_length_*`` (computed
once per batch on the CPU); failing that they are derived once per forward from
``position_ids`` (cached, so the layers share one derivation), or each row is one sequence.

Every other call — a padded batch, cached decoding, ``generate()``, a custom 4D mask — goes
to the implementation the model had before (``sdpa``, ``eager``, ...), with the mask that
implementation's own mask builder made: the mask builder registered for our name hands those
calls to the original builder. So the model computes exactly as stock wherever we do not
take the call.
"""

from __future__ import annotations

import math
import sys
import threading
import weakref
from typing import Optional

import torch

from .. import fallback
from ..collate import lengths_from_position_ids
from . import backends

NAME = "unsloth_varlen"
COMPONENT = "varlen attention"
DEFAULT_ORIGINAL = "sdpa"

# Keywords that change the attention's maths and that our kernels do not implement. The plan
# refuses models whose attention passes them (a positive check on the call site); meeting one
# here is the safety net: the call goes to the original implementation, per sequence.
UNSUPPORTED_VALUES = ("s_aux", "sinks", "position_bias", "head_mask", "attn_bias", "alibi")

_state = threading.local()
_preference = {"value": "auto"}
_originals: dict = {}  # id(config) -> the implementation the model had before ours


def set_preference(value: str) -> None:
    """auto | triton | torch — from UNSLOTH_PATCH_ATTENTION, set by the trainer plan."""
    _preference["value"] = value if value in ("auto", "triton", "torch") else "auto"


def remember_original(config, name: Optional[str]) -> None:
    """Record the implementation ``config`` had before it was switched to ours."""
    _originals[id(config)] = name or DEFAULT_ORIGINAL


def forget_original(config) -> None:
    _originals.pop(id(config), None)


def original_of(config) -> str:
    return _originals.get(id(config), DEFAULT_ORIGINAL)


# --------------------------------------------------------------------------- the mask builder


def takes_mask_call(kwargs) -> bool:
    """Whether the attention will take this forward: no padding mask, no cache offset, q == kv."""
    if kwargs.get("attention_mask") is not None or kwargs.get("use_vmap"):
        return False
    if kwargs.get("kv_offset", 0) or kwargs.get("q_offset", 0):
        return False
    q_length = kwargs.get("q_length")
    if q_length is None:
        cache_position = kwargs.get("cache_position")
        q_length = None if cache_position is None else cache_position.shape[0]
    return q_length is not None and q_length == kwargs.get("kv_length")


def varlen_mask(*args, **kwargs):
    """Mask builder for our name: none for the calls we take, the original builder's otherwise."""
    if takes_mask_call(kwargs):
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    original = original_of(kwargs.get("config"))
    mapping = getattr(ALL_MASK_ATTENTION_FUNCTIONS, "_global_mapping", {})
    builder = mapping.get(original) or mapping.get(DEFAULT_ORIGINAL)
    return builder(*args, **kwargs)


# --------------------------------------------------------------------------- the attention


def _original_function(module):
    """The attention function the module would call under its original implementation."""
    name = original_of(getattr(module, "config", None))
    if name == "eager":
        function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if function is not None:
            return function
        name = DEFAULT_ORIGINAL
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def _unsupported(kwargs) -> Optional[str]:
    for key in UNSUPPORTED_VALUES:
        if kwargs.get(key) is not None:
            return key
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if kwargs.get("is_causal") is False:
        return "is_causal=False"
    return None


def varlen_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' attention signature: query [B, H, L, D] -> (output [B, L, H, D], weights or None)."""
    cu = kwargs.get("cu_seq_lens_q")
    ours = query.shape[2] == key.shape[2] and (cu is not None or attention_mask is None)
    if not ours:  # padded batch, cached decoding, a custom mask: exactly what the model did before
        return _original_function(module)(module, query, key, value, attention_mask, *args, **kwargs)
    batch, heads, length, head_dim = query.shape
    if cu is None:
        cu, max_len = boundaries(batch, length, kwargs.get("position_ids"), query.device)
    else:
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
    if _unsupported(kwargs) or args or not fallback.enabled(COMPONENT):
        return per_sequence_original(module, query, key, value, cu, args, kwargs)
    dropout = kwargs.get("dropout", 0.0) or 0.0
    scaling = kwargs.get("scaling")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    training = bool(getattr(module, "training", False))
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], head_dim)
    try:
        out = run_varlen(q, k, v, cu, max_len, scale=scale, window=kwargs.get("sliding_window") or None,
                         softcap=kwargs.get("softcap"), dropout=dropout if training else 0.0, training=training)
    except Exception as exc:
        if fallback.propagates(exc):
            raise
        fallback.failed(COMPONENT, exc, "the model's own attention, one sequence at a time,")
        return per_sequence_original(module, query, key, value, cu, args, kwargs)
    return out.reshape(batch, length, heads, head_dim), None


def boundaries(batch: int, length: int, position_ids, device):
    """cu_seqlens and the longest length of a batch without collator boundaries."""
    if batch == 1 and position_ids is not None and position_ids.shape[-1] == length:
        return _boundaries_from_positions(position_ids)
    # unpadded rows, each its own sequence
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device), length


def _boundaries_from_positions(position_ids: torch.Tensor):
    """Boundaries of a flat row, computed once per forward: every layer gets the same ``position_ids``
    object. The cache holds that object weakly and matches it by identity and version, never by
    address: the caching allocator hands a freed address to the next step's tensor of the same shape."""
    cached = getattr(_state, "positions", None)
    if cached is not None and cached[0]() is position_ids and cached[1] == position_ids._version:
        return cached[2]
    lengths = lengths_from_position_ids(position_ids.detach())
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=position_ids.device)
    cu[1:] = torch.cumsum(lengths.to(position_ids.device), 0)
    result = (cu, int(lengths.max()))
    _state.positions = (weakref.ref(position_ids), position_ids._version, result)
    return result


def run_varlen(q, k, v, cu, max_len, *, scale, window, softcap, dropout, training):
    """q [T, H, D], k/v [T, Hk, D] on the backend the toggle and the call allow."""
    backend = backends.choose(_preference["value"], q.device, q.dtype, q.shape[-1], window, softcap, dropout)
    if backend == "masked" and cu.device != torch.device("cpu"):
        cu = cu.cpu()
    return backends.run(backend, q.contiguous(), k.contiguous(), v.contiguous(), cu, int(max_len), scale=scale,
                        window=window, softcap=softcap, dropout=dropout, training=training)


def per_sequence_original(module, query, key, value, cu, args, kwargs):
    """The original implementation, called once per sequence of a flat batch with its causal mask.

    Exact for whatever the module's attention does (sinks, biases, ...): each sequence is the
    unpadded one-sequence call the model would make on its own. Slow; the safety net.
    """
    function = _original_function(module)
    name = original_of(getattr(module, "config", None))
    window = kwargs.get("sliding_window") or None
    rest = {k: v for k, v in kwargs.items()
            if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")}
    batch, _, length, _ = query.shape
    q, k, v = (t.transpose(1, 2).reshape(1, batch * length, t.shape[1], t.shape[3]).transpose(1, 2)
               for t in (query, key, value))
    bounds = cu.tolist()
    outputs, weights = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        mask = causal_mask(end - start, window, name, query.dtype, query.device)
        out, weight = function(module, q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], mask,
                               *args, **rest)
        outputs.append(out)
        weights.append(weight)
    out = torch.cat(outputs, dim=1) if outputs else query.new_zeros(1, 0, query.shape[1], query.shape[3])
    return out.reshape(batch, length, *out.shape[2:]), None


def causal_mask(length: int, window: Optional[int], implementation: str, dtype, device):
    """A one-sequence causal (windowed) mask in the form ``implementation`` expects.

    SDPA takes no mask at all for plain causal attention (``is_causal``), a boolean one with a
    window; eager-style implementations add a float mask (0 or the dtype's minimum).
    """
    if implementation == "sdpa" and window is None:
        return None
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    allowed = allowed[None, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
