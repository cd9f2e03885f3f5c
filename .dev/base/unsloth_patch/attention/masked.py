"""Boundary-correct attention with plain PyTorch ops: the path for CPUs and the reference.

Each sequence attends only to itself because each sequence is computed on its own: there is
no mask to get wrong. Supports GQA, sliding windows and logit soft-capping, so it serves every
model family the fused kernels serve (slower, but exact).
"""

from __future__ import annotations

from typing import Optional

import torch


_SDPA_GQA = "enable_gqa" in (torch.nn.functional.scaled_dot_product_attention.__doc__ or "")


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)  # heads: [..., H, L, D]


def causal_attention(q, k, v, *, scale: float, window: Optional[int] = None, softcap: Optional[float] = None,
                     dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """One sequence: q [H, L, D], k/v [Hk, L, D] -> [H, L, D]."""
    groups = q.shape[0] // k.shape[0]
    length = q.shape[1]
    if softcap is None:  # SDPA covers causal and windowed attention without soft-capping
        mask = None if window is None else _causal_window_mask(length, window, q.device)
        if groups > 1 and _SDPA_GQA:
            extra = {"enable_gqa": True}  # no repeated K/V copies
        else:
            extra, k, v = {}, _repeat_kv(k, groups), _repeat_kv(v, groups)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout if training else 0.0, scale=scale,
            **extra,
        )
    scores = torch.matmul(q, _repeat_kv(k, groups).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~_causal_window_mask(length, window, q.device), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout and training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs, _repeat_kv(v, groups))


def _causal_window_mask(length: int, window: Optional[int], device) -> torch.Tensor:
    """True where query i may attend key j: j <= i and, with a window W, i - j < W."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed


def varlen_attention_masked(q, k, v, cu_seqlens, *, scale: float, window=None, softcap=None,
                            dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Packed sequences: q [T, H, D], k/v [T, Hk, D], cu_seqlens [N+1] -> [T, H, D]."""
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        out = causal_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            scale=scale, window=window, softcap=softcap, dropout=dropout, training=training,
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs, dim=0) if outputs else q.new_zeros(q.shape)
