"""Fused RoPE: the wiring on every family and transformers version, and the kernel against float64.

Tests parametrised over ``kernel_mode`` run twice: ``reference`` (every session, no Triton needed:
the ``unsloth_patch::rope`` custom op with its PyTorch reference in place of the launch, so the
wiring, the op's autograd and the fallbacks are exercised on transformers 4.46 to 5.x) and
``triton`` (marker ``kernels``: the Triton kernel, in the interpreter on a CPU).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import textwrap
import types

import pytest
import torch

from unsloth_patch import fallback, layers, rope_fusion
from unsloth_patch.edits import Edits
from unsloth_patch.kernels import rope as rope_kernel
from unsloth_patch.settings import Settings
from unsloth_patch.tiny import available_families, build_model

from .helpers import fresh_fallbacks, losses, plugin_log, sft_config, sft_trainer, text_dataset, use_settings  # noqa: F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = ["reference", pytest.param("triton", marks=pytest.mark.kernels)]
ONLY_ROPE = Settings(kernels_off=("rmsnorm", "swiglu"))


@pytest.fixture
def kernel_mode(request, monkeypatch):
    """Which RoPE implementation the wiring calls; returns the list of calls it made."""
    if request.param == "triton":
        pytest.importorskip("triton")
        real = rope_fusion._kernel
    else:
        monkeypatch.setattr(rope_kernel, "_forward_triton", rope_kernel._forward_reference)
        monkeypatch.setattr(rope_kernel, "_backward_triton", rope_kernel._backward_reference)
        monkeypatch.setattr(rope_fusion, "_kernel_available", lambda: True)
        monkeypatch.setattr(layers, "_triton_available", lambda: True)

        def real(q, k, cos, sin):
            return rope_kernel._rope_op(q, k, cos, sin)

    calls = []

    def counted(q, k, cos, sin):
        calls.append(tuple(q.shape))
        return real(q, k, cos, sin)

    monkeypatch.setattr(rope_fusion, "_kernel", counted)
    return calls


def _close(actual, expected, tol=1e-5, what=""):
    assert actual.shape == expected.shape, what
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


# -- transformers' families ----------------------------------------------------------------------

FAMILIES = [f for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2") if f in available_families()]


def _tiny(family):
    model = build_model(family, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, num_layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.to(DEVICE)


def _run(model, ids, position_ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, position_ids=position_ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel_mode", MODES, indirect=True)
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_attention_matches_the_familys_own(family, kernel_mode):
    model = _tiny(family)
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    # restarting positions, as in a padding-free row: each token's cos/sin follow its own position
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3], list(range(11))], device=DEVICE)
    logits, grads = _run(model, ids, position_ids)
    originals = {name: vars(m).get("forward") for name, m in model.named_modules()}
    edits = Edits()
    report = layers.fuse_model_layers(model, ONLY_ROPE, edits, force=True)
    assert report["fused"] == {"rope": 2}, report
    assert sum(layers.is_fused(m) for m in model.modules()) == 2
    fused_logits, fused_grads = _run(model, ids, position_ids)
    assert len(kernel_mode) == 2  # one call per layer: q and k together
    _close(fused_logits, logits, what="logits")
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        _close(fused_grads[name], grad, what=name)
    edits.rollback()
    assert {name: vars(m).get("forward") for name, m in model.named_modules()} == originals
    assert not any(layers.is_fused(m) or hasattr(m, "_unsloth_rope_head_dim") for m in model.modules())


@pytest.mark.parametrize("kernel_mode", MODES, indirect=True)
def test_thirty_training_steps_match_unfused(tokenizer, tmp_path, monkeypatch, use_settings, kernel_mode):
    """SFTTrainer, padding-free rows (restarting position_ids), 30 steps: fused RoPE vs KERNELS_OFF=rope."""
    import unsloth_patch

    unsloth_patch.apply()
    monkeypatch.setattr(layers, "_model_reason", lambda model: None)  # fuse on this CPU model
    dataset = text_dataset(tokenizer, limit=60)
    # fp32 (TRL 1.x defaults to bf16 autocast, where eager rounds each half of dq to bf16 and we round once)
    config = dict(max_length=40, max_steps=30, learning_rate=3e-3, per_device_train_batch_size=2, bf16=False)
    runs = {}
    for name, off in (("unfused", ("rmsnorm", "swiglu", "rope")), ("fused", ("rmsnorm", "swiglu"))):
        use_settings(padding_free="on", kernels_off=off)
        model = build_model("llama", vocab_size=len(tokenizer), seed=0)
        trainer = sft_trainer(model, tokenizer, dataset, sft_config(tmp_path / name, **config))
        trainer.train()
        runs[name] = losses(trainer)
        if name == "fused":
            assert layers.last_fusion()["fused"] == {"rope": 2}
            assert not any(layers.is_fused(m) for m in model.modules())  # rolled back after train()
    assert len(kernel_mode) >= 60 and len(runs["fused"]) == 30
    for step, (a, b) in enumerate(zip(runs["unfused"], runs["fused"])):
        assert abs(a - b) <= 1e-4 * abs(a), (step, runs)
    assert runs["fused"][-1] < runs["fused"][0]  # it trained


@pytest.mark.parametrize("kernel_mode", MODES, indirect=True)
def test_toggles_leave_rope_out(kernel_mode):
    model = _tiny("llama")
    before = [vars(m).get("forward") for m in model.modules()]
    edits = Edits()
    report = layers.fuse_model_layers(model, Settings(kernels_off=("rope",)), edits, force=True)
    assert "rope" not in report["fused"] and "KERNELS_OFF: rope" in report["reason"]
    assert not any(rope_fusion.is_fused(m) for m in model.modules())
    edits.rollback()
    everything = Settings(kernels_off=("rmsnorm", "swiglu", "rope"))
    report = layers.fuse_model_layers(model, everything, Edits(), force=True)
    assert report["fused"] == {} and "UNSLOTH_PATCH_KERNELS_OFF=rmsnorm,swiglu,rope" in report["reason"]
    report = layers.fuse_model_layers(model, Settings(kernels="off"), Edits(), force=True)
    assert report["fused"] == {} and "UNSLOTH_PATCH_KERNELS=off" in report["reason"]
    assert [vars(m).get("forward") for m in model.modules()] == before
    assert kernel_mode == []


def test_toggle_names_parse_and_bad_ones_fail():
    from unsloth_patch.settings import read_settings

    assert read_settings({"UNSLOTH_PATCH_KERNELS_OFF": " RoPE ,swiglu"}).kernels_off == ("swiglu", "rope")
    assert read_settings({}).kernels_off == ()
    assert read_settings({"UNSLOTH_PATCH_KERNELS_OFF": "rope"}).as_environment()["UNSLOTH_PATCH_KERNELS_OFF"] == "rope"
    for bad in ("ropes", "rope,,rmsnorm", "geglu", ","):
        with pytest.raises(ValueError, match="UNSLOTH_PATCH_KERNELS_OFF") as err:
            read_settings({"UNSLOTH_PATCH_KERNELS_OFF": bad})
        assert "rmsnorm, swiglu, rope" in str(err.value)


# -- synthetic modeling modules: what the wiring accepts and refuses -----------------------------------

BASE = '''
import functools
import torch
from torch import nn


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


SCALE = 1.0


def logged(function):
    seen = []

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        seen.append(1)
        return function(*args, **kwargs)

    return wrapper


class Attention(nn.Module):
    def __init__(self, heads=4, kv_heads=2, head_dim=8):
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(12, heads * head_dim)
        self.k_proj = nn.Linear(12, kv_heads * head_dim)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return torch.cat((q, k), 1) * SCALE
'''


def _modeling(name, extra=""):
    module = types.ModuleType(f"fake_modeling_{name}")
    sys.modules[module.__name__] = module
    exec(compile(textwrap.dedent(BASE) + textwrap.dedent(extra), module.__name__, "exec"), module.__dict__)
    return module


def _inputs(t=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, 12, generator=g).to(DEVICE).requires_grad_()
    cos, sin = torch.randn(2, t, d, generator=g).to(DEVICE), torch.randn(2, t, d, generator=g).to(DEVICE)
    return x, cos, sin


def _compare(attention, inputs, fused_calls, expect_fused=True):
    x, cos, sin = inputs
    expected = type(attention).forward(attention, x, cos, sin)
    grad_expected = torch.autograd.grad(expected.square().sum(), x)[0]
    before = len(fused_calls)
    got = attention(x, cos, sin)
    grad = torch.autograd.grad(got.square().sum(), x)[0]
    assert (len(fused_calls) > before) == expect_fused
    _close(got, expected, what="output")
    _close(grad, grad_expected, what="grad")


@pytest.mark.parametrize("kernel_mode", MODES, indirect=True)
def test_a_plain_module_is_fused_and_sees_its_live_globals(kernel_mode):
    modeling = _modeling("plain")
    attention = modeling.Attention().to(DEVICE)
    edits = Edits()
    assert rope_fusion.is_candidate(attention) and rope_fusion.fuse(attention, edits) == ""
    _compare(attention, _inputs(), kernel_mode)
    modeling.SCALE = 2.0  # a later rebinding in the modeling module is seen by the rebuilt forward
    _compare(attention, _inputs(seed=1), kernel_mode)
    replacement = modeling.apply_rotary_pos_emb
    modeling.apply_rotary_pos_emb = lambda q, k, cos, sin: replacement(q, k, cos, sin)
    _compare(attention, _inputs(seed=2), kernel_mode, expect_fused=False)  # someone else's now: theirs runs
    modeling.apply_rotary_pos_emb = replacement
    edits.rollback()
    assert "forward" not in vars(attention) and modeling.apply_rotary_pos_emb is replacement


@pytest.mark.parametrize("kernel_mode", MODES, indirect=True)
def test_decorated_forwards_transposed_layouts_and_class_switches(kernel_mode):
    modeling = _modeling("decorated", '''
    class Decorated(Attention):
        @logged
        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            q = self.q_proj(x).view(b, t, -1, self.head_dim)  # [B, T, H, D]: rotated with unsqueeze_dim=2
            k = self.k_proj(x).view(b, t, -1, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
            return torch.cat((q, k), 2).transpose(1, 2)
    ''')
    attention = modeling.Decorated().to(DEVICE)
    edits = Edits()
    assert rope_fusion.fuse(attention, edits) == ""
    _compare(attention, _inputs(), kernel_mode)
    edits.setattr(attention, "__class__", modeling.Attention)  # as the legacy attention path does
    _compare(attention, _inputs(seed=1), kernel_mode)  # the new class's forward, rebuilt in turn
    edits.rollback()
    assert type(attention) is modeling.Decorated and "forward" not in vars(attention)


INTERLEAVED = '''
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate(x):
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)

    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
'''
PARTIAL = '''
def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    n = cos.shape[-1]
    q_rot, q_pass, k_rot, k_pass = q[..., :n], q[..., n:], k[..., :n], k[..., n:]
    q_rot = q_rot * cos + rotate_half(q_rot) * sin
    k_rot = k_rot * cos + rotate_half(k_rot) * sin
    return torch.cat((q_rot, q_pass), -1), torch.cat((k_rot, k_pass), -1)
'''
ODD_SIGNATURE = '''
def apply_rotary_pos_emb(q, k, cos, sin, interleaved):
    return q, k
'''
NO_ROPE = '''
class Attention(nn.Module):
    def forward(self, x):
        return rotate_half(x)
'''


@pytest.mark.parametrize("kernel_mode", MODES, indirect=True)
def test_modules_whose_rope_differs_are_left_alone_with_a_reason(kernel_mode):
    interleaved = _modeling("interleaved", INTERLEAVED).Attention()
    assert "behaves unlike" in rope_fusion.fuse(interleaved, Edits())
    odd = _modeling("odd", ODD_SIGNATURE).Attention()
    assert "unknown parameters" in rope_fusion.fuse(odd, Edits())
    assert not rope_fusion.is_candidate(_modeling("none", NO_ROPE).Attention())
    hooked = _modeling("hooked").Attention()
    hooked.forward = functools.partial(type(hooked).forward, hooked)
    assert "already replaced" in rope_fusion.fuse(hooked, Edits())
    model = torch.nn.ModuleDict({"interleaved": interleaved, "plain": _modeling("plain2").Attention()})
    edits = Edits()
    report = layers.fuse_model_layers(model, ONLY_ROPE, edits, force=True)
    assert report["fused"] == {"rope": 1} and "behaves unlike" in report["skipped"]["interleaved"]
    edits.rollback()
    assert "forward" not in vars(model["plain"])


@pytest.mark.parametrize("kernel_mode", MODES, indirect=True)
def test_calls_it_cannot_take_go_to_the_original(kernel_mode, monkeypatch):
    partial = _modeling("partial", PARTIAL).Attention().to(DEVICE)
    edits = Edits()
    assert rope_fusion.fuse(partial, edits) == ""  # full-width probe passes; a narrower table is handed back
    x, cos, sin = _inputs()
    _compare(partial, (x, cos[..., :4], sin[..., :4]), kernel_mode, expect_fused=False)
    _compare(partial, (x, cos, sin), kernel_mode)
    edits.rollback()
    fused = rope_fusion.fused_function(_modeling("args", PARTIAL).apply_rotary_pos_emb)
    q, k = torch.randn(1, 4, 6, 8, device=DEVICE), torch.randn(1, 2, 6, 8, device=DEVICE)
    cos, sin = torch.randn(1, 6, 8, device=DEVICE), torch.randn(1, 6, 8, device=DEVICE)
    before = len(kernel_mode)
    for args, kwargs in (((torch.arange(6),), {}), ((), {"position_ids": torch.arange(6)}),
                         ((None, 0), {}), ((), {"bogus": 1})):
        try:
            fused(q, k, cos, sin, *args, **kwargs)  # the original's own behaviour, error or not
        except TypeError:
            assert "bogus" in kwargs
    fused(q, k, cos.requires_grad_(), sin)  # tables that want a gradient
    cos.requires_grad_(False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEVICE == "cpu":
        fused(q, k, cos, sin)  # a CPU tensor outside the interpreter
    assert len(kernel_mode) == before
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for got, want in zip(fused(q, k, cos, sin, None, 1), rope_kernel.rope_reference(q, k, cos, sin)):
        _close(got, want)
    assert len(kernel_mode) == before + 1


@pytest.mark.parametrize("kernel_mode", MODES, indirect=True)
def test_a_failing_rope_warns_once_and_runs_the_original(kernel_mode, monkeypatch, caplog):
    attention = _modeling("failing").Attention().to(DEVICE)
    edits = Edits()
    assert rope_fusion.fuse(attention, edits) == ""

    def broken(*args):
        raise RuntimeError("injected rope fault")

    monkeypatch.setattr(rope_fusion, "_kernel", broken)
    with plugin_log(caplog, logging.WARNING):
        _compare(attention, _inputs(), [], expect_fused=False)
        _compare(attention, _inputs(seed=1), [], expect_fused=False)
    said = [r.getMessage() for r in caplog.records if "injected rope fault" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(rope_fusion.ROPE)
    assert rope_fusion.ROPE in fallback.failures()
    edits.rollback()


@pytest.mark.parametrize("kernel_mode", MODES, indirect=True)
def test_torch_compile_traces_the_class_forward(kernel_mode):
    attention = _modeling("compiled").Attention().to(DEVICE)
    edits = Edits()
    assert rope_fusion.fuse(attention, edits) == ""
    x, cos, sin = _inputs()
    expected = type(attention).forward(attention, x, cos, sin)
    torch._dynamo.reset()
    compiled = torch.compile(attention, backend="eager", fullgraph=True)
    _close(compiled(x, cos, sin), expected)
    assert kernel_mode == []  # Dynamo cannot guard the rebuilt globals: under compile the class forward runs
    _close(attention(x, cos, sin), expected)
    assert len(kernel_mode) == 1
    edits.rollback()


# -- the kernel against float64 ------------------------------------------------------------------------


def _fresh_seed():
    return int.from_bytes(os.urandom(4), "little")


def _tables(batch, tokens, dim, kind, g):
    if kind == "random":  # halves differ: the general linear map, not only transformers' [c, c]
        return torch.randn(batch, tokens, dim, generator=g), torch.randn(batch, tokens, dim, generator=g)
    if kind == "restarting":
        positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3][i % 9] for i in range(tokens)]).expand(batch, -1)
    else:
        positions = torch.arange(tokens).expand(batch, -1)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = positions[..., None].double() * inv
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().float(), emb.sin().float()


def _qk(batch, heads, kv_heads, tokens, dim, layout, g):
    if layout == "transposed":  # transformers' view(B, T, H, D).transpose(1, 2)
        q = torch.randn(batch, tokens, heads, dim, generator=g).transpose(1, 2)
        k = torch.randn(batch, tokens, kv_heads, dim, generator=g).transpose(1, 2)
    elif layout == "sliced":  # q and k cut from one fused projection, then transposed
        qkv = torch.randn(batch, tokens, (heads + 2 * kv_heads) * dim, generator=g)
        q = qkv[..., : heads * dim].view(batch, tokens, heads, dim).transpose(1, 2)
        k = qkv[..., heads * dim: (heads + kv_heads) * dim].view(batch, tokens, kv_heads, dim).transpose(1, 2)
    else:
        q = torch.randn(batch, heads, tokens, dim, generator=g)
        k = torch.randn(batch, kv_heads, tokens, dim, generator=g)
    return q, k


CASES = [  # batch, q heads, kv heads, tokens, head dim, table batch, tables, layout
    (2, 4, 2, 9, 16, 1, "restarting", "transposed"),
    (2, 4, 2, 9, 16, 2, "restarting", "sliced"),
    (1, 3, 1, 13, 40, 1, "positions", "contiguous"),
    (3, 2, 2, 5, 8, 3, "random", "transposed"),
    (2, 8, 1, 4, 64, 2, "random", "sliced"),
]


@pytest.mark.kernels
@pytest.mark.parametrize("small_tiles", [False, True], ids=["tiles", "one-head-tiles"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}x{c[2]}-d{c[4]}-{c[6]}-{c[7]}" for c in CASES])
def test_kernel_matches_float64_forward_and_backward(case, small_tiles, monkeypatch):
    pytest.importorskip("triton")
    if small_tiles:  # one head and one token a tile: the head loop and the token blocks
        monkeypatch.setattr(rope_kernel, "_TILE", 8)
    batch, heads, kv_heads, tokens, dim, table_batch, tables, layout = case
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    q, k = _qk(batch, heads, kv_heads, tokens, dim, layout, g)
    cos, sin = (t[:table_batch].contiguous() for t in _tables(batch, tokens, dim, tables, g))
    q, k = q.to(DEVICE).requires_grad_(), k.to(DEVICE).requires_grad_()
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    dq, dk = torch.randn(q.shape, generator=g).to(DEVICE), torch.randn(k.shape, generator=g).to(DEVICE)
    q_out, k_out = rope_kernel.rope(q, k, cos, sin)
    if layout != "sliced":  # laid out like the input where it is dense
        assert q_out.stride() == q.stride() and k_out.stride() == k.stride()
    torch.autograd.backward((q_out, k_out), (dq.transpose(-1, -2).contiguous().transpose(-1, -2), dk))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    q_want, k_want = rope_kernel.rope_reference(q64, k64, cos.double(), sin.double())
    torch.autograd.backward((q_want, k_want), (dq.double(), dk.double()))
    what = f"seed {seed}"
    _close(q_out, q_want, what=what)
    _close(k_out, k_want, what=what)
    _close(q.grad, q64.grad, what=what)
    _close(k.grad, k64.grad, what=what)


@pytest.mark.kernels
def test_kernel_dtypes_follow_eager_promotion():
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(_fresh_seed())
    q, k = (t.to(DEVICE) for t in _qk(2, 4, 2, 5, 16, "transposed", g))
    cos, sin = (t.to(DEVICE) for t in _tables(1, 5, 16, "positions", g))
    half = rope_kernel.rope(q.half(), k.half(), cos.half(), sin.half())
    want = rope_kernel.rope_reference(q.double(), k.double(), cos.double(), sin.double())
    assert all(t.dtype == torch.float16 for t in half)
    for got, expected in zip(half, want):
        _close(got, expected, tol=2e-3)
    mixed = rope_kernel.rope(q.half().requires_grad_(), k.half(), cos, sin)  # fp16 q, fp32 tables: fp32 out
    assert all(t.dtype == torch.float32 for t in mixed)
    mixed[0].sum().backward()
    if DEVICE == "cuda":
        assert rope_kernel.rope(q.bfloat16(), k.bfloat16(), cos.bfloat16(), sin.bfloat16())[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="partial rotary"):
        rope_kernel.rope(q, k, cos[..., :8], sin[..., :8])
    with pytest.raises(ValueError, match="odd"):
        rope_kernel.rope(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])
