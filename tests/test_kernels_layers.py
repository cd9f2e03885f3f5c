"""Fused RMSNorm and gated-activation kernels, and models whose layers use them.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) in fp32; gradients are
compared against a float64 PyTorch reference, and fused tiny models against unfused ones.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from unsloth_patch.edits import Edits  # noqa: E402
from unsloth_patch.kernels import rmsnorm as rmsnorm_module  # noqa: E402
from unsloth_patch.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402
from unsloth_patch.kernels.swiglu import geglu, gated_activation, swiglu  # noqa: E402
from unsloth_patch.layers import fuse_model_layers, is_fused, last_fusion  # noqa: E402
from unsloth_patch.settings import Settings  # noqa: E402
from unsloth_patch.tiny import available_families, build_model  # noqa: E402

pytestmark = pytest.mark.kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _leaf(*shape, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE).requires_grad_()


def _close(actual, expected, tol=1e-5):
    assert actual.shape == expected.shape
    err = (actual.double() - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= tol * scale, f"max abs error {err:.3g} (scale {scale:.3g})"


# -- RMSNorm ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows_kernel", [False, True], ids=["row-blocks", "one-row"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(3, 7, 96), (11, 200), (2, 5, 3, 40)])
def test_rmsnorm_matches_float64_reference(shape, offset, rows_kernel, monkeypatch):
    monkeypatch.setitem(rmsnorm_module.BACKWARD, "rows_kernel_min_n", 1 if rows_kernel else 1 << 30)
    n = shape[-1]
    x = _leaf(*shape, scale=2.0, shift=0.3, seed=1)
    w = _leaf(n, scale=0.5, shift=0.2, seed=2)
    dy = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    y = rms_norm(x, w, 1e-6, offset)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, 1e-6, offset)
    y64.backward(dy.double())
    _close(y, y64)
    _close(x.grad, x64.grad)
    _close(w.grad, w64.grad)


def test_rmsnorm_takes_strided_rows_and_is_deterministic():
    base = _leaf(4, 9, 200, seed=4)
    x = base.transpose(0, 1)  # not contiguous
    w = _leaf(200, shift=1.0, seed=5)
    dy = torch.randn(9, 4, 200, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    grads = []
    for _ in range(2):
        base.grad = w.grad = None
        rms_norm(x, w, 1e-5).backward(dy)
        grads.append((base.grad.clone(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    rms_norm_reference(x64, w64, 1e-5).backward(dy.double())
    _close(grads[0][0].transpose(0, 1), x64.grad)
    _close(grads[0][1], w64.grad)


def test_rmsnorm_output_dtype_follows_transformers():
    x = _leaf(5, 96, seed=7).detach().to(torch.bfloat16)
    w32 = torch.ones(96, device=DEVICE)
    assert rms_norm(x, w32, 1e-6).dtype == torch.float32  # weight * x.to(bf16): promoted, as in Llama
    assert rms_norm(x, w32, 1e-6, 1.0).dtype == torch.bfloat16  # Gemma casts back to the input dtype
    with pytest.raises(ValueError):
        rms_norm(x, torch.ones(95, device=DEVICE), 1e-6)


# -- gated activations -----------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(3, 5, 200), (7, 333)])
def test_gated_activation_matches_float64_reference(shape, activation):
    g = _leaf(*shape, scale=3.0, shift=-0.2, seed=8)
    u = _leaf(*shape, seed=9)
    dy = torch.randn(*shape, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    fn = swiglu if activation == "silu" else geglu
    y = fn(g, u)
    y.backward(dy)
    g64 = g.detach().double().requires_grad_()
    u64 = u.detach().double().requires_grad_()
    act = torch.nn.functional.silu if activation == "silu" else (
        lambda t: torch.nn.functional.gelu(t, approximate="tanh"))
    (act(g64) * u64).backward(dy.double())
    _close(y, act(g64.detach()) * u64.detach())
    _close(g.grad, g64.grad)
    _close(u.grad, u64.grad)


def test_gated_activation_checks_its_arguments():
    g = _leaf(4, 6, seed=11)
    with pytest.raises(ValueError):
        gated_activation(g, _leaf(4, 5, seed=12))
    with pytest.raises(ValueError):
        gated_activation(g, g, "relu")


# -- fused models ----------------------------------------------------------------------------------

FAMILIES = [f for f in ("llama", "qwen3", "gemma") if f in available_families()]
EXPECTED = {"llama": {"rmsnorm": 5, "swiglu": 2, "rope": 2}, "qwen3": {"rmsnorm": 9, "swiglu": 2, "rope": 2},
            "gemma": {"rmsnorm_gemma": 5, "geglu": 2, "rope": 2}}


def _tiny(family):
    model = build_model(family, hidden_size=96, intermediate_size=200, num_heads=4, num_kv_heads=2, num_layers=2)
    with torch.no_grad():  # move the norms off their 1 / 0 init so a wrong formula shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.to(DEVICE)


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_gives_the_same_logits_and_grads(family):
    model = _tiny(family)
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(13)).to(DEVICE)
    logits, grads = _logits_and_grads(model, ids)
    originals = {name: vars(m).get("forward") for name, m in model.named_modules()}
    edits = Edits()
    report = fuse_model_layers(model, Settings(), edits, force=True)
    assert report["fused"] == EXPECTED[family] and last_fusion() == report
    fused_logits, fused_grads = _logits_and_grads(model, ids)
    _close(fused_logits, logits.double())
    for name, grad in grads.items():
        _close(fused_grads[name], grad.double())
    edits.rollback()
    assert {name: vars(m).get("forward") for name, m in model.named_modules()} == originals
    assert not any(is_fused(m) for m in model.modules())
    assert not any(hasattr(m, "_unsloth_activation") or hasattr(m, "_unsloth_eps") or hasattr(m, "_unsloth_rope_head_dim")
                   for m in model.modules())


def test_fused_model_under_gradient_checkpointing():
    model = _tiny("llama")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(14)).to(DEVICE)
    logits, grads = _logits_and_grads(model, ids)
    edits = Edits()
    fuse_model_layers(model, Settings(), edits, force=True)
    fused_logits, fused_grads = _logits_and_grads(model, ids)
    _close(fused_logits, logits.double())
    for name, grad in grads.items():
        _close(fused_grads[name], grad.double())
    edits.rollback()


def test_fusing_twice_changes_nothing_more():
    model = _tiny("llama")
    edits = Edits()
    first = fuse_model_layers(model, Settings(), edits, force=True)
    forwards = [vars(m).get("forward") for m in model.modules()]
    assert fuse_model_layers(model, Settings(), Edits(), force=True)["fused"] == first["fused"]
    assert [vars(m).get("forward") for m in model.modules()] == forwards
    edits.rollback()
    assert not any(is_fused(m) for m in model.modules())


def test_lora_projections_keep_working():
    peft = pytest.importorskip("peft")
    model = _tiny("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"])
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters count
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(15)).to(DEVICE)
    logits, grads = _logits_and_grads(wrapped, ids)
    edits = Edits()
    assert fuse_model_layers(wrapped.get_base_model(), Settings(), edits, force=True)["fused"]["swiglu"] == 2
    fused_logits, fused_grads = _logits_and_grads(wrapped, ids)
    _close(fused_logits, logits.double())
    assert any("lora_B" in n for n in grads)
    for name, grad in grads.items():
        _close(fused_grads[name], grad.double())
    edits.rollback()
