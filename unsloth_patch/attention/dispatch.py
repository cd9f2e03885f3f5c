"""The attention function transformers calls for models switched to ``unsloth_varlen``.

Sequence boundaries come from the collator's ``cu_seq_lens_*``/``max_length_*`` (computed once
per batch on the CPU); failing that they are derived once per forward from ``position_ids``
(cached on the tensor, so the layers share one derivation). A padded batch, which arrives
with a 4D mask, is computed exactly as transformers would (SDPA, or eager with soft-capping).
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import torch

from ..collate import lengths_from_position_ids
from . import backends
from .masked import _repeat_kv

NAME = "unsloth_varlen"

_state = threading.local()
_preference = {"value": "auto"}


def set_preference(value: str) -> None:
    """auto | triton | torch — from UNSLOTH_PATCH_ATTENTION, set by the trainer plan."""
    _preference["value"] = value if value in ("auto", "triton", "torch") else "auto"


def _boundaries_from_positions(position_ids: torch.Tensor):
    key = (position_ids.data_ptr(), position_ids._version, tuple(position_ids.shape), position_ids.device)
    cached = getattr(_state, "positions", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    lengths = lengths_from_position_ids(position_ids.detach())
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=position_ids.device)
    cu[1:] = torch.cumsum(lengths.to(position_ids.device), 0)
    result = (cu, int(lengths.max()))
    _state.positions = (key, result)
    return result


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                             softcap: Optional[float] = None, **kwargs):
    """transformers' attention signature: query [B, H, L, D] -> (output [B, L, H, D], None)."""
    batch, heads, length, head_dim = query.shape
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None and attention_mask is not None:
        return _padded(module, query, key, value, attention_mask, dropout, scale, softcap, kwargs)
    if cu is None:
        cu, max_len = boundaries(batch, length, kwargs.get("position_ids"), query.device)
    elif max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], head_dim)
    training = bool(getattr(module, "training", False))
    out = run_varlen(q, k, v, cu, max_len, scale=scale, window=sliding_window or None, softcap=softcap,
                     dropout=dropout if training else 0.0, training=training)
    return out.reshape(batch, length, heads, head_dim), None


def boundaries(batch: int, length: int, position_ids, device):
    """cu_seqlens and the longest length of a batch without collator boundaries."""
    if batch == 1 and position_ids is not None and position_ids.shape[-1] == length:
        return _boundaries_from_positions(position_ids)
    # unpadded rows, each its own sequence
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device), length


def run_varlen(q, k, v, cu, max_len, *, scale, window, softcap, dropout, training):
    """q [T, H, D], k/v [T, Hk, D] on the backend the toggle and the call allow."""
    backend = backends.choose(_preference["value"], q.device, q.dtype, q.shape[-1], window, softcap, dropout)
    if backend == "masked" and cu.device != torch.device("cpu"):
        cu = cu.cpu()
    return backends.run(backend, q.contiguous(), k.contiguous(), v.contiguous(), cu, int(max_len), scale=scale,
                        window=window, softcap=softcap, dropout=dropout, training=training)


def _padded(module, query, key, value, attention_mask, dropout, scale, softcap, kwargs):
    """A padded batch with its prepared mask: the same computation transformers does."""
    groups = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, groups), _repeat_kv(value, groups)
    mask = attention_mask[:, :, :, : k.shape[-2]] if attention_mask.dim() == 4 else attention_mask
    training = bool(getattr(module, "training", False))
    if softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, k, v, attn_mask=mask, dropout_p=dropout if training else 0.0, scale=scale,
        )
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if dropout and training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), None


def varlen_mask(*args, **kwargs):
    """Mask builder for our name: none for padding-free batches, SDPA's mask for padded ones."""
    if kwargs.get("attention_mask") is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)
