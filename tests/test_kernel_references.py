"""The PyTorch references each kernel falls back to compute the kernel's maths, forward and backward.

They run when a Triton launch fails (see ``kernels/_guard.py``), so they are held to the same
float64 references as the kernels. No Triton needed: these run in every session.
"""

from __future__ import annotations

import math

import pytest
import torch

import importlib

from unsloth_patch.kernels import rmsnorm, rope, swiglu

va = importlib.import_module("unsloth_patch.kernels.varlen_attention")


def _leaf(*shape, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * 1.5).to(dtype)


def _float64_attention(q, k, v, cu, scale, causal, window, softcap):
    """Autograd-able float64 attention, one sequence at a time, nothing clever."""
    group = q.shape[1] // k.shape[1]
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        qs = q[a:b].transpose(0, 1)
        ks = k[a:b].transpose(0, 1).repeat_interleave(group, dim=0)
        vs = v[a:b].transpose(0, 1).repeat_interleave(group, dim=0)
        s = qs @ ks.transpose(-1, -2) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        allowed = (j <= i) if causal else torch.ones(n, n, dtype=torch.bool)
        if window is not None:
            allowed = allowed & (i - j < window)
        s = s.masked_fill(~allowed, float("-inf"))
        outs.append((torch.softmax(s, -1) @ vs).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("lengths, hq, hk, kw", [
    ((5, 1, 9), 4, 2, {}),
    ((7, 12), 4, 4, {"window": 3}),
    ((6, 6, 2), 2, 1, {"softcap": 3.0}),
    ((8,), 4, 2, {"window": 4, "softcap": 5.0}),
    ((4, 5), 2, 2, {"causal": False}),
])
def test_attention_reference_forward_and_backward_match_float64(lengths, hq, hk, kw):
    d = 16
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _leaf(total, hq, d, seed=1), _leaf(total, hk, d, seed=2), _leaf(total, hk, d, seed=3)
    do = _leaf(total, hq, d, seed=4)
    causal, window, softcap = kw.get("causal", True), kw.get("window"), kw.get("softcap")
    scale = 1.0 / math.sqrt(d)
    out, lse = va._forward_reference(q, k, v, cu, max(lengths), None, causal, window, softcap)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    expected = _float64_attention(q64, k64, v64, cu, scale, causal, window, softcap)
    assert (out.double() - expected).abs().max() <= 1e-5
    assert lse.shape == (hq, total) and torch.isfinite(lse).all()
    expected.backward(do.double())
    grads = va._backward_reference(do, q, k, v, out, lse, cu, max(lengths), None, causal, window, softcap)
    for got, want in zip(grads, (q64.grad, k64.grad, v64.grad)):
        assert got.shape == want.shape and (got.double() - want).abs().max() <= 1e-4


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rmsnorm_reference_forward_and_backward_match_float64(offset):
    x, w, dy = _leaf(7, 48, seed=5), _leaf(48, seed=6), _leaf(7, 48, seed=7)
    y, rstd = rmsnorm._forward_reference(x, w, 1e-6, offset)
    assert (y - rmsnorm.rms_norm_reference(x, w, 1e-6, offset)).abs().max() <= 1e-6
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (w64 + offset)
    expected.backward(dy.double())
    dx, dw = rmsnorm._backward_reference(dy, x, w, rstd, offset)
    assert (dx.double() - x64.grad).abs().max() <= 1e-4
    assert (dw.double() - w64.grad).abs().max() <= 1e-4


@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu_tanh"])
def test_gated_reference_forward_and_backward_match_float64(gelu):
    g, u, dy = _leaf(5, 33, seed=8), _leaf(5, 33, seed=9), _leaf(5, 33, seed=10)
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    act = torch.nn.functional.gelu(g64, approximate="tanh") if gelu else torch.nn.functional.silu(g64)
    expected = act * u64
    expected.backward(dy.double())
    assert (swiglu._forward_reference(g, u, gelu).double() - expected).abs().max() <= 1e-5
    dg, du = swiglu._backward_reference(dy, g, u, gelu)
    assert (dg.double() - g64.grad).abs().max() <= 1e-4 and (du.double() - u64.grad).abs().max() <= 1e-4


@pytest.mark.parametrize("table_batch", [1, 3])
def test_rope_reference_forward_and_backward_match_float64(table_batch):
    q = _leaf(3, 5, 4, 12, seed=11).transpose(1, 2)  # [B, H, T, D] as transformers lays it out
    k = _leaf(3, 5, 2, 12, seed=12).transpose(1, 2)
    cos, sin = _leaf(table_batch, 5, 12, seed=13), _leaf(table_batch, 5, 12, seed=14)  # halves differ
    dq, dk = _leaf(3, 4, 5, 12, seed=15), _leaf(3, 2, 5, 12, seed=16)
    q_out, k_out = rope._forward_reference(q, k, cos, sin)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    half = 6

    def rotate(x):  # written out, independently of the module's rotate_half
        return torch.cat((-x[..., half:], x[..., :half]), -1)

    c64, s64 = cos.double()[:, None], sin.double()[:, None]
    q_want, k_want = q64 * c64 + rotate(q64) * s64, k64 * c64 + rotate(k64) * s64
    assert (q_out.double() - q_want).abs().max() <= 1e-5 and (k_out.double() - k_want).abs().max() <= 1e-5
    torch.autograd.backward((q_want, k_want), (dq.double(), dk.double()))
    dq_got, dk_got = rope._backward_reference(dq, dk, cos, sin)
    assert (dq_got.double() - q64.grad).abs().max() <= 1e-5 and (dk_got.double() - k64.grad).abs().max() <= 1e-5


def test_kernels_are_registered_as_custom_ops_with_fake_implementations():
    for name in ("varlen_attention", "varlen_attention_backward", "rms_norm", "rms_norm_backward",
                 "gated_activation", "gated_activation_backward", "rope", "rope_backward"):
        op = getattr(torch.ops.unsloth_patch, name)
        assert op.default is not None
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(11, 4, 64, dtype=torch.bfloat16)
        k = torch.empty(11, 2, 64, dtype=torch.bfloat16)
        cu = torch.empty(3, dtype=torch.int32)
        out, lse = torch.ops.unsloth_patch.varlen_attention(q, k, k, cu, 8, None, True, None, None)
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (4, 11) and lse.dtype == torch.float32
        x, w = torch.empty(6, 32, dtype=torch.bfloat16), torch.empty(32, dtype=torch.float32)
        y, rstd = torch.ops.unsloth_patch.rms_norm(x, w, 1e-6, 0.0)
        assert y.dtype == torch.float32 and rstd.shape == (6,)
        assert torch.ops.unsloth_patch.gated_activation(x, x, False).shape == x.shape
        q = torch.empty(2, 7, 4, 64, dtype=torch.bfloat16).transpose(1, 2)
        table = torch.empty(1, 7, 64, dtype=torch.float32)
        q_out, k_out = torch.ops.unsloth_patch.rope(q, q[:, :2], table, table)
        assert q_out.shape == q.shape and q_out.stride() == q.stride() and q_out.dtype == torch.float32
        assert k_out.shape == (2, 2, 7, 64)
        dq, _ = torch.ops.unsloth_patch.rope_backward(q_out, k_out, table, table)
        assert dq.shape == q.shape and dq.dtype == torch.float32
