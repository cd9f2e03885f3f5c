"""Which varlen attention runs: our Triton kernel, torch's ``varlen_attn``, or the masked path.

``UNSLOTH_PATCH_ATTENTION``: ``auto`` takes the first that supports the call (Triton on CUDA
GPUs it supports, then torch's FlashAttention-backed ``varlen_attn``, then the masked path);
``triton``/``torch`` force one and fail clearly where it cannot run.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Optional

import torch

from ..errors import UnslothPatchError
from .masked import varlen_attention_masked

BACKENDS = ("triton", "torch", "masked")


@lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def triton_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    if device.type != "cuda":
        return False
    try:
        from ..kernels import is_supported
    except Exception:
        return False
    try:
        return bool(is_supported(device, dtype, head_dim))
    except Exception:
        return False


def torch_varlen_available(device: torch.device, dtype: torch.dtype, head_dim: int, window, softcap) -> bool:
    found = _torch_varlen()
    if found is None or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if softcap is not None:
        return False
    if window is not None and "window_size" not in found[1]:
        return False
    return head_dim <= 256


def choose(preference: str, device: torch.device, dtype: torch.dtype, head_dim: int,
           window=None, softcap=None, dropout: float = 0.0) -> str:
    """The backend for one call. ``preference`` is the toggle value (auto/triton/torch)."""
    if dropout:
        return "masked"  # only the masked path implements attention dropout
    if preference == "triton":
        if not triton_available(device, dtype, head_dim):
            raise UnslothPatchError(
                f"UNSLOTH_PATCH_ATTENTION=triton, but the Triton kernel cannot run here "
                f"(device {device}, dtype {dtype}, head dim {head_dim}); accepted: a CUDA GPU of compute "
                "capability >= 8.0 with fp16/bf16 and head dim 64/80/96/128/256, or UNSLOTH_PATCH_ATTENTION=auto."
            )
        return "triton"
    if preference == "torch":
        if not torch_varlen_available(device, dtype, head_dim, window, softcap):
            raise UnslothPatchError(
                f"UNSLOTH_PATCH_ATTENTION=torch, but torch.nn.attention.varlen.varlen_attn cannot run this call "
                f"(device {device}, dtype {dtype}, window {window}, softcap {softcap}); it needs a CUDA GPU, "
                "fp16/bf16, no soft-capping. Use UNSLOTH_PATCH_ATTENTION=auto to fall back automatically."
            )
        return "torch"
    if triton_available(device, dtype, head_dim):
        return "triton"
    if torch_varlen_available(device, dtype, head_dim, window, softcap):
        return "torch"
    return "masked"


def run(backend: str, q, k, v, cu_seqlens, max_seqlen: int, *, scale: float, window: Optional[int],
        softcap: Optional[float], dropout: float = 0.0, training: bool = False):
    """q [T, H, D], k/v [T, Hk, D] -> [T, H, D] on the chosen backend."""
    if backend == "triton":
        from ..kernels import varlen_attention

        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale, causal=True,
                                window=window, softcap=softcap)
    if backend == "torch":
        return _run_torch(q, k, v, cu_seqlens, max_seqlen, scale=scale, window=window)
    return varlen_attention_masked(q, k, v, cu_seqlens, scale=scale, window=window, softcap=softcap,
                                   dropout=dropout, training=training)


def _run_torch(q, k, v, cu_seqlens, max_seqlen, *, scale, window):
    varlen_attn, params = _torch_varlen()
    kwargs = {"scale": scale}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if window is None else (window - 1, 0)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)
