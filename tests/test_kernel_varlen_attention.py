"""Contract tests for the varlen attention kernel (Triton interpreter on CPU, or a GPU).

Every result is compared with a float64 per-sequence reference written out in
plain PyTorch: explicit scores, explicit mask, softmax.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from unsloth_patch.kernels import is_supported, varlen_attention  # noqa: E402

import importlib  # noqa: E402

va = importlib.import_module("unsloth_patch.kernels.varlen_attention")
va_launch = importlib.import_module("unsloth_patch.kernels.varlen_attention_launch")

pytestmark = pytest.mark.kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_attention(q, k, v, cu_seqlens, softmax_scale=None, causal=True, window=None, softcap=None):
    """float64, one sequence at a time, nothing clever."""
    q, k, v = q.double(), k.double(), v.double()
    total, num_q_heads, head_dim = q.shape
    group = num_q_heads // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n == 0:
            continue
        qs = q[start:end].transpose(0, 1)  # [Hq, n, D]
        ks = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None, :]
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= j <= i
        if window is not None:
            allowed &= j > i - window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out.append((torch.softmax(scores, dim=-1) @ vs).transpose(0, 1))
    return torch.cat(out)


def make_batch(lengths, num_q_heads, num_kv_heads, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(total, num_q_heads, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    do = torch.randn(total, num_q_heads, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k, v, cu, do


def run_both(lengths, hq, hk, d, dtype=torch.float32, seed=0, **kw):
    q, k, v, cu, do = make_batch(lengths, hq, hk, d, dtype, seed)
    out = varlen_attention(q, k, v, cu, max(lengths), **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, cu, **kw)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    return (out, *grads), (ref, *ref_grads)


def assert_close(ours, refs, rel_tol, abs_tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, refs):
        a = a.detach().double()
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        err = (a - b).abs().max().item()
        scale = max(1.0, b.abs().max().item())
        # A reference that is exactly zero (dq of a 1-token sequence) has no relative error to speak of.
        rel_ok = rel <= rel_tol or b.norm().item() < 1e-9
        assert rel_ok and err <= abs_tol * scale, f"{name}: relative {rel:.2e}, max abs {err:.2e}"


CASES = [
    # lengths (1-token sequences, lengths not multiples of the tile), Hq, Hk, D, kwargs
    pytest.param([1, 37, 16, 50], 4, 1, 64, {}, id="gqa4-d64"),
    pytest.param([17, 1, 33], 2, 2, 64, {"window": 5}, id="mha-d64-window"),
    pytest.param([40, 3], 8, 1, 64, {"softcap": 5.0}, id="gqa8-d64-softcap"),
    pytest.param([33, 1, 20], 2, 2, 80, {"window": 7, "softcap": 5.0}, id="mha-d80-window-softcap"),
    pytest.param([25, 30, 1], 4, 1, 96, {"softmax_scale": 0.3}, id="gqa4-d96-scale"),
    pytest.param([20, 13], 4, 2, 64, {"causal": False}, id="noncausal"),
    pytest.param([1], 2, 1, 64, {}, id="single-token"),
    pytest.param([48, 9], 2, 1, 64, {"window": 16}, id="window-tile-aligned"),
]


@pytest.mark.parametrize("lengths,hq,hk,d,kw", CASES)
def test_fp32_matches_float64_reference(lengths, hq, hk, d, kw):
    ours, refs = run_both(lengths, hq, hk, d, **kw)
    assert_close(ours, refs, rel_tol=1e-5, abs_tol=1e-4)


TILINGS = [
    {"fwd": (32, 16, 1, 1), "bwd_kv": (16, 32, 1, 1), "bwd_q": (32, 16, 1, 1)},
    {"fwd": (16, 32, 1, 1), "bwd_kv": (32, 16, 1, 1), "bwd_q": (16, 32, 1, 1)},
]


@pytest.mark.parametrize("tiling", TILINGS, ids=["tall", "wide"])
@pytest.mark.parametrize("kw", [{}, {"window": 19, "softcap": 4.0}], ids=["causal", "window-softcap"])
def test_other_tilings(monkeypatch, tiling, kw):
    """Block ranges must be right when BLOCK_M != BLOCK_N, not only for square tiles."""
    monkeypatch.setattr(va_launch, "select_config", lambda *a: tiling)
    ours, refs = run_both([70, 1, 35], 2, 1, 64, seed=3, **kw)
    assert_close(ours, refs, rel_tol=1e-5, abs_tol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"window": 9, "softcap": 10.0}], ids=["causal", "window-softcap"])
def test_fp16(kw):
    ours, refs = run_both([29, 1, 18], 4, 2, 64, dtype=torch.float16, seed=5, **kw)
    assert ours[0].dtype == torch.float16
    assert_close(ours, refs, rel_tol=2e-3, abs_tol=1e-2)


def test_every_output_element_is_written(monkeypatch):
    """Outputs and saved statistics start as NaN; any row left unwritten shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*a, **kw):
        t = real_empty_like(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(va.torch, "empty", nan_empty)
    monkeypatch.setattr(va.torch, "empty_like", nan_empty_like)
    ours, refs = run_both([1, 23, 16, 2], 2, 1, 64, seed=7, window=6)
    assert_close(ours, refs, rel_tol=1e-5, abs_tol=1e-4)


def test_no_cross_sequence_leakage():
    lengths = [19, 24, 11]
    q, k, v, cu, do = make_batch(lengths, 2, 1, 64, seed=11)
    out = varlen_attention(q, k, v, cu, max(lengths))
    grads = torch.autograd.grad(out, (q, k, v), do)

    k2, v2 = k.detach().clone(), v.detach().clone()
    s, e = 19, 43  # the middle sequence
    k2[s:e] = torch.randn(e - s, *k.shape[1:], generator=torch.Generator().manual_seed(99)).to(k2)
    v2[s:e] = torch.randn(e - s, *v.shape[1:], generator=torch.Generator().manual_seed(98)).to(v2)
    k2.requires_grad_()
    v2.requires_grad_()
    out2 = varlen_attention(q, k2, v2, cu, max(lengths))
    grads2 = torch.autograd.grad(out2, (q, k2, v2), do)

    assert not torch.equal(out[s:e], out2[s:e])
    for a, b in [(out, out2), *zip(grads, grads2)]:
        assert torch.equal(a[:s], b[:s])
        assert torch.equal(a[e:], b[e:])


def test_backward_is_deterministic():
    q, k, v, cu, do = make_batch([30, 5], 4, 1, 64, seed=13)
    first = torch.autograd.grad(varlen_attention(q, k, v, cu, 30), (q, k, v), do)
    second = torch.autograd.grad(varlen_attention(q, k, v, cu, 30), (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_window_wider_than_every_sequence_is_plain_causal():
    q, k, v, cu, _ = make_batch([12, 7], 2, 2, 64, seed=17)
    with torch.no_grad():
        assert torch.equal(varlen_attention(q, k, v, cu, 12, window=12), varlen_attention(q, k, v, cu, 12))


def test_bad_inputs_raise_clear_errors():
    q, k, v, cu, _ = make_batch([8, 8], 4, 2, 64)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        varlen_attention(q[:, :3], k, v, cu, 8)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, k, v, cu.long(), 8)
    q48, k48, v48, _, _ = make_batch([8, 8], 2, 2, 48)
    with pytest.raises(ValueError, match="head_dim 48 is not supported"):
        varlen_attention(q48, k48, v48, cu, 8)
    with pytest.raises(ValueError, match="same shape"):
        varlen_attention(q, k, v[:, :1], cu, 8)
    with pytest.raises(ValueError, match="same number of tokens"):
        varlen_attention(q[:10], k, v, cu, 8)
    with pytest.raises(ValueError, match="dtype"):
        varlen_attention(q, k.double(), v.double(), cu, 8)
    with pytest.raises(ValueError, match="causal"):
        varlen_attention(q, k, v, cu, 8, causal=False, window=4)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, k, v, cu, torch.tensor(8))


def test_is_supported():
    assert is_supported(DEVICE, torch.float32, 64)
    assert is_supported(DEVICE, torch.float16, 96)
    assert not is_supported(DEVICE, torch.float32, 48)
    assert not is_supported(DEVICE, torch.int32, 64)


def test_import_without_triton_fails_only_when_called():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "import unsloth_patch.kernels as k\n"
        "assert not k.is_supported('cpu', torch.float32, 64)\n"
        "q = torch.randn(4, 2, 64); cu = torch.tensor([0, 4], dtype=torch.int32)\n"
        "try:\n"
        "    k.varlen_attention(q, q, q, cu, 4)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
