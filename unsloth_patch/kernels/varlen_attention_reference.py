"""The varlen attention's maths in plain PyTorch (float32, one sequence at a time).

What the tests compare the kernels against, and what the op computes instead when a launch fails
(``_guard``): the output, the base-2 log-sum-exp the backward reads, and the three gradients.
"""

from __future__ import annotations

import torch

from .varlen_attention_launch import LOG2E, scalars

def reference_scores(q, k, scale, causal, window, softcap):
    """Scores (fp32, capped, masked) of one sequence: q [H, n, D], k [H, n, D] -> [H, n, n]."""
    raw = torch.matmul(q, k.transpose(-1, -2)) * scale
    capped = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    n = q.shape[1]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    allowed = (j <= i) if causal else torch.ones(n, n, dtype=torch.bool, device=q.device)
    if window is not None:
        allowed = allowed & (i - j < window)
    return raw, capped.masked_fill(~allowed, float("-inf"))


def sequences(cu_seqlens):
    bounds = cu_seqlens.tolist()
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def forward_reference(q, k, v, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap):
    """The kernel's maths in plain PyTorch (fp32), one sequence at a time: ``(out, base-2 lse)``."""
    total, heads, head_dim = q.shape
    group = heads // k.shape[1]
    scale, _, _, _ = scalars(head_dim, sm_scale, softcap)
    out = torch.zeros_like(q)
    lse = torch.zeros((heads, total), device=q.device, dtype=torch.float32)
    for a, b in sequences(cu_seqlens):
        qs = q[a:b].transpose(0, 1).float()
        ks = k[a:b].transpose(0, 1).float().repeat_interleave(group, dim=0)
        vs = v[a:b].transpose(0, 1).float().repeat_interleave(group, dim=0)
        _, scores = reference_scores(qs, ks, scale, causal, window, softcap)
        lse[:, a:b] = torch.logsumexp(scores, dim=-1) * LOG2E
        out[a:b] = torch.matmul(torch.softmax(scores, dim=-1), vs).transpose(0, 1).to(q.dtype)
    return out, lse


def backward_reference(do, q, k, v, out, lse, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap):
    """Gradients of the kernel's maths in plain PyTorch (fp32), recomputed from q, k, v."""
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    group = heads // kv_heads
    scale, _, _, _ = scalars(head_dim, sm_scale, softcap)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, b in sequences(cu_seqlens):
        n = b - a
        qs = q[a:b].transpose(0, 1).float()
        ks = k[a:b].transpose(0, 1).float().repeat_interleave(group, dim=0)
        vs = v[a:b].transpose(0, 1).float().repeat_interleave(group, dim=0)
        dos = do[a:b].transpose(0, 1).float()
        raw, scores = reference_scores(qs, ks, scale, causal, window, softcap)
        p = torch.softmax(scores, dim=-1)
        o = torch.matmul(p, vs)
        dvs = torch.matmul(p.transpose(-1, -2), dos)
        dp = torch.matmul(dos, vs.transpose(-1, -2))
        ds = p * (dp - (dos * o).sum(-1, keepdim=True))
        if softcap is not None:
            ds = ds * (1.0 - torch.tanh(raw / softcap) ** 2)
        dqs = torch.matmul(ds, ks) * scale
        dks = torch.matmul(ds.transpose(-1, -2), qs) * scale
        dq[a:b] = dqs.transpose(0, 1).to(q.dtype)
        dk[a:b] = dks.reshape(kv_heads, group, n, head_dim).sum(1).transpose(0, 1).to(k.dtype)
        dv[a:b] = dvs.reshape(kv_heads, group, n, head_dim).sum(1).transpose(0, 1).to(v.dtype)
    return dq, dk, dv
