"""Compile kernels ahead of their first use, by launching each once on a few rows.

Triton compiles a kernel at its first launch for each specialisation (dtype, head dim, block
sizes, flags) and keeps it in memory and in its on-disk cache. Launching the variants a run will
use on tiny inputs — while the rest of the trainer is being built — moves that compilation off
the first training step. The launches bypass the run-time fallback (``_guard``): an error here says
nothing about the real calls, which keep their own fallback; it is returned, not raised.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class AttentionSpec:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    window: Optional[int] = None
    softcap: Optional[float] = None


@dataclass(frozen=True)
class NormSpec:
    size: int
    dtype: torch.dtype
    weight_dtype: torch.dtype
    offset: float = 0.0


@dataclass(frozen=True)
class GatedSpec:
    dtype: torch.dtype
    gelu: bool = False


@dataclass(frozen=True)
class RopeSpec:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype  # q and k (the projections' output: the compute dtype)
    table_dtype: torch.dtype  # cos and sin (transformers casts them to the hidden states' dtype)


def _attention(spec: AttentionSpec, device) -> None:
    va = importlib.import_module("unsloth_patch.kernels.varlen_attention")
    lengths = [5, 67]  # a short and a longer-than-one-block sequence
    total = sum(lengths)
    cu = torch.tensor([0, lengths[0], total], dtype=torch.int32, device=device)
    q = torch.randn(total, spec.heads, spec.head_dim, device=device, dtype=spec.dtype)
    k = torch.randn(total, spec.kv_heads, spec.head_dim, device=device, dtype=spec.dtype)
    v = torch.randn_like(k)
    window = spec.window if spec.window is not None and spec.window < max(lengths) else None
    if spec.window is not None and window is None:
        window = max(1, max(lengths) - 1)  # the windowed variant, whatever the real window
    out, lse = va._forward(q, k, v, cu, max(lengths), None, True, window, spec.softcap)
    va._backward(torch.randn_like(out), q, k, v, out, lse, cu, max(lengths), None, True, window, spec.softcap)


def _norm(spec: NormSpec, device) -> None:
    rms = importlib.import_module("unsloth_patch.kernels.rmsnorm")
    rows = 8
    x = torch.randn(rows, spec.size, device=device, dtype=spec.dtype)
    weight = torch.randn(spec.size, device=device, dtype=spec.weight_dtype)
    y, rstd = rms._forward_triton(x, weight, 1e-6, spec.offset)
    rms._backward_triton(torch.randn_like(y).to(x.dtype), x, weight, rstd, spec.offset)


def _gated(spec: GatedSpec, device) -> None:
    sw = importlib.import_module("unsloth_patch.kernels.swiglu")
    gate = torch.randn(4, 256, device=device, dtype=spec.dtype)
    up = torch.randn_like(gate)
    y = sw._forward_triton(gate, up, spec.gelu)
    sw._backward_triton(torch.randn_like(y), gate, up, spec.gelu)


def _rope(spec: RopeSpec, device) -> None:
    rp = importlib.import_module("unsloth_patch.kernels.rope")
    tokens = 7
    # laid out as transformers lays them out: view(B, T, H, D).transpose(1, 2) of the projections
    q = torch.randn(1, tokens, spec.heads, spec.head_dim, device=device, dtype=spec.dtype).transpose(1, 2)
    k = torch.randn(1, tokens, spec.kv_heads, spec.head_dim, device=device, dtype=spec.dtype).transpose(1, 2)
    cos = torch.randn(1, tokens, spec.head_dim, device=device, dtype=spec.table_dtype)
    sin = torch.randn_like(cos)
    q_out, k_out = rp._forward_triton(q, k, cos, sin)
    rp._backward_triton(torch.randn_like(q_out), torch.randn_like(k_out), cos, sin)


_LAUNCH = {AttentionSpec: _attention, NormSpec: _norm, GatedSpec: _gated, RopeSpec: _rope}


def warm_up(specs, device) -> list:
    """Launch each spec's kernels once on ``device``; returns ``[(spec, error)]`` for those that failed."""
    failed = []
    for spec in specs:
        try:
            _LAUNCH[type(spec)](spec, device)
        except Exception as exc:  # the real call has its own fallback; this only moves compilation earlier
            failed.append((spec, f"{type(exc).__name__}: {exc}"))
    return failed
