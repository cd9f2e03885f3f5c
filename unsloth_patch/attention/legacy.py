"""Varlen attention for transformers without AttentionInterface (< 4.51).

Those versions pick an attention *class* per implementation. Their FlashAttention-2 classes
already read packed-sequence boundaries from ``position_ids``, and call a module-level
``_flash_attention_forward``; without the flash-attn package that function cannot run. For a
padding-free trainer we move the model's attention modules to their family's FlashAttention-2
class (same parameters) and give that family module our varlen attention as
``_flash_attention_forward``. Everything goes through ``Edits``, so it is undone with the plan.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from typing import Optional

import torch

from .. import fallback
from . import backends
from .dispatch import COMPONENT, boundaries, run_varlen


class _Disabled(Exception):
    """Our varlen path was switched off earlier in this run."""

NAME = "flash_attention_2"  # what the model's config must say for its mask logic; runs our kernels
# FlashAttention-2 classes of these versions drop Gemma2's soft-capping without the flash-attn package.
UNSUPPORTED_MODEL_TYPES = {"gemma2": "its FlashAttention-2 class drops logit soft-capping without flash-attn"}


def _family_module(model):
    return sys.modules.get(type(model).__module__)


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def blocker(model) -> Optional[str]:
    """Why this model cannot take the legacy varlen path, or None if it can."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in UNSUPPORTED_MODEL_TYPES:
        return f"{model_type}: {UNSUPPORTED_MODEL_TYPES[model_type]}"
    if _flash_attn_installed():
        return "flash-attn is installed: select attn_implementation='flash_attention_2' instead"
    module = _family_module(model)  # some families import _flash_attention_forward only with flash-attn
    if module is None or not _attention_modules(model, module):
        return f"{type(model).__name__}: no attention module with a FlashAttention-2 class found"
    return None


def _attention_modules(model, family):
    found = []
    for sub in model.modules():
        name = type(sub).__name__
        if name.endswith("FlashAttention2"):
            found.append((sub, type(sub)))
            continue
        for suffix in ("SdpaAttention", "Attention"):
            if name.endswith(suffix):
                flash = getattr(family, name[: -len(suffix)] + "FlashAttention2", None)
                if isinstance(flash, type) and isinstance(sub, flash.__mro__[1]):
                    found.append((sub, flash))
                break
    return found


def switch(model, edits) -> int:
    """Move ``model`` onto the legacy varlen path; returns how many attention modules moved."""
    family = _family_module(model)
    modules = _attention_modules(model, family)
    for module, flash in modules:
        if type(module) is not flash:
            edits.setattr(module, "__class__", flash)
        edits.setattr(module, "_flash_attn_uses_top_left_mask", False)
    edits.setattr(family, "_flash_attention_forward", varlen_flash_attention_forward)
    edits.setattr(model.config, "_attn_implementation", NAME)
    return len(modules)


def varlen_flash_attention_forward(query_states, key_states, value_states, attention_mask, query_length,
                                   is_causal=True, dropout=0.0, position_ids=None, softmax_scale=None,
                                   sliding_window=None, use_top_left_mask=False, softcap=None,
                                   deterministic=None, **kwargs):
    """The ``_flash_attention_forward`` signature: q/k/v [B, L, H, D] -> [B, L, H, D]."""
    batch, length, heads, head_dim = query_states.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    window = sliding_window if sliding_window and sliding_window < length else None
    if key_states.shape[1] != length:  # cached decoding: the keys run ahead of the queries
        return _dense_with_offset(query_states, key_states, value_states, attention_mask, scale,
                                  sliding_window or None, softcap)
    if attention_mask is not None:  # padded rows: attend within each row's real tokens
        keep = attention_mask.bool()
        lengths = keep.sum(dim=1)
        q, k, v = query_states[keep], key_states[keep], value_states[keep]
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
        cu[1:] = torch.cumsum(lengths, 0)
        longest = int(lengths.max())
    else:
        cu, longest = boundaries(batch, length, position_ids, query_states.device)
        q = query_states.reshape(batch * length, heads, head_dim)
        k = key_states.reshape(batch * length, key_states.shape[2], head_dim)
        v = value_states.reshape(batch * length, value_states.shape[2], head_dim)
    try:
        if not fallback.enabled(COMPONENT):
            raise _Disabled
        out = run_varlen(q, k, v, cu, longest, scale=scale, window=window, softcap=softcap, dropout=dropout,
                         training=dropout > 0)
    except Exception as exc:
        if fallback.propagates(exc):
            raise
        if not isinstance(exc, _Disabled):
            fallback.failed(COMPONENT, exc, "exact attention with plain torch operations")
        out = backends.run("masked", q.contiguous(), k.contiguous(), v.contiguous(), cu.cpu(), longest, scale=scale,
                           window=window, softcap=softcap, dropout=dropout, training=dropout > 0)
    if attention_mask is not None:
        full = query_states.new_zeros(batch, length, heads, head_dim)
        full[keep] = out
        return full
    return out.reshape(batch, length, heads, head_dim)


def _dense_with_offset(query_states, key_states, value_states, attention_mask, scale, window, softcap):
    """Queries at the end of longer keys (a KV cache), bottom-right causal, padded keys masked."""
    length, keys = query_states.shape[1], key_states.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (query_states, key_states, value_states))  # [B, H, L, D]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    i = torch.arange(length, device=q.device)[:, None] + (keys - length)
    j = torch.arange(keys, device=q.device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, -keys:]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2)
