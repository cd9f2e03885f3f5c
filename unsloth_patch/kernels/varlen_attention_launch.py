"""How the varlen attention's Triton kernels are launched: tiles per head dim, grids, and the backward's plan.

The kernels are in ``varlen_attention_kernels.py``; the op, its checks and its autograd in ``varlen_attention.py``.
Tile sizes were hand-picked on an H100 (``docs/kernel-notes.md``); ``benchmarks/attention.py --tune`` sweeps
them by replacing :func:`select_config`, as the tests do to cover other tilings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._triton import triton
from . import varlen_attention_kernels as _k

LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, hand-picked per head
# dim on an H100 (see docs/kernel-notes.md). Keys: fwd, bwd_kv, bwd_q.
GPU_CONFIGS = {
    64: {"fwd": (64, 64, 4, 3), "bwd_kv": (32, 64, 4, 3), "bwd_q": (64, 32, 4, 4)},
    128: {"fwd": (64, 64, 4, 3), "bwd_kv": (32, 64, 4, 2), "bwd_q": (64, 32, 4, 4)},
    256: {"fwd": (64, 32, 4, 2), "bwd_kv": (32, 32, 4, 1), "bwd_q": (32, 32, 4, 1)},
}
# Small tiles keep the CPU interpreter fast; 16 is tl.dot's minimum.
INTERPRETER_CONFIG = {"fwd": (16, 16, 1, 1), "bwd_kv": (16, 16, 1, 1), "bwd_q": (16, 16, 1, 1)}


def select_config(head_dim: int, block_d: int, dtype, device) -> dict:
    """Block sizes for one call; tests monkeypatch this to cover other tilings."""
    if device.type == "cpu":
        return INTERPRETER_CONFIG
    if block_d <= 64:
        cfg = GPU_CONFIGS[64]
    elif block_d <= 128:
        cfg = GPU_CONFIGS[128]
    else:
        cfg = GPU_CONFIGS[256]
    if dtype == torch.float32:  # fp32 tiles are twice the bytes: halve the key block
        cfg = {name: (bm, max(16, bn // 2), w, max(1, s - 1)) for name, (bm, bn, w, s) in cfg.items()}
    return cfg


def last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def scalars(head_dim, softmax_scale, softcap):
    sm_scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if softcap is None:
        return sm_scale, sm_scale * LOG2E, 0.0, 0.0
    return sm_scale, sm_scale * LOG2E, sm_scale / float(softcap), float(softcap) * LOG2E


def forward(q, k, v, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap):
    total, num_q_heads, head_dim = q.shape
    num_seqs = cu_seqlens.numel() - 1
    block_d = triton.next_power_of_2(head_dim)
    sm_scale, qk_scale_log2, softcap_in, softcap_out_log2 = scalars(head_dim, sm_scale, softcap)
    cfg = select_config(head_dim, block_d, q.dtype, q.device)
    block_m, block_n, num_warps, num_stages = cfg["fwd"]
    out = torch.empty_like(q)
    lse = torch.empty((num_q_heads, total), device=q.device, dtype=torch.float32)
    grid = (num_q_heads, num_seqs, triton.cdiv(max_seqlen, block_m))
    _k._fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        total, window or 0,
        qk_scale_log2, softcap_in, softcap_out_log2,
        GROUP=num_q_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap):
    plan = backward_plan(q, k, sm_scale, causal, window, softcap)
    do = last_dim_contiguous(do)
    delta = backward_delta(plan, out, do, lse)
    dk, dv = backward_kv(plan, do, q, k, v, lse, delta, cu_seqlens, max_seqlen, window)
    dq = backward_q(plan, do, q, k, v, lse, delta, cu_seqlens, max_seqlen, window)
    return dq, dk, dv


@dataclass(frozen=True)
class BackwardPlan:
    """What the backward's three launches share; each launch compiles apart (the warm-up runs them at once)."""

    scalars: tuple  # sm_scale, qk_scale_log2, softcap_in, softcap_out_log2
    cfg: dict
    common: dict
    block_d: int


def backward_plan(q, k, sm_scale, causal, window, softcap) -> BackwardPlan:
    head_dim, num_q_heads, num_kv_heads = q.shape[2], q.shape[1], k.shape[1]
    block_d = triton.next_power_of_2(head_dim)
    common = dict(
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
        CAUSAL=causal, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
    )
    return BackwardPlan(scalars(head_dim, sm_scale, softcap), select_config(head_dim, block_d, q.dtype, q.device),
                         common, block_d)


def backward_delta(plan: BackwardPlan, out, do, lse):
    """rowsum(dO * O) per query row and head."""
    total, num_q_heads, head_dim = out.shape
    delta = torch.empty_like(lse)
    block_t = 64 if plan.block_d <= 128 else 32
    _k._bwd_delta_kernel[(triton.cdiv(total, block_t), num_q_heads)](
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), total,
        HEAD_DIM=head_dim, BLOCK_D=plan.block_d, BLOCK_T=block_t,
    )
    return delta


def backward_kv(plan: BackwardPlan, do, q, k, v, lse, delta, cu_seqlens, max_seqlen, window):
    total, num_kv_heads, num_seqs = q.shape[0], k.shape[1], cu_seqlens.numel() - 1
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    block_m, block_n, num_warps, num_stages = plan.cfg["bwd_kv"]
    _k._bwd_kv_kernel[(num_kv_heads, num_seqs, triton.cdiv(max_seqlen, block_n))](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        total, window or 0, *plan.scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **plan.common,
    )
    return dk, dv


def backward_q(plan: BackwardPlan, do, q, k, v, lse, delta, cu_seqlens, max_seqlen, window):
    total, num_q_heads, num_seqs = q.shape[0], q.shape[1], cu_seqlens.numel() - 1
    dq = torch.empty_like(q)
    block_m, block_n, num_warps, num_stages = plan.cfg["bwd_q"]
    _k._bwd_q_kernel[(num_q_heads, num_seqs, triton.cdiv(max_seqlen, block_m))](
        q, k, v, do, lse, delta, dq, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        total, window or 0, *plan.scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **plan.common,
    )
    return dq
