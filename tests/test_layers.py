"""Which modules get fused forwards, and when nothing is fused (mostly without running a kernel)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unsloth_patch import layers
from unsloth_patch.edits import Edits
from unsloth_patch.layers import fuse_model_layers, last_fusion
from unsloth_patch.settings import Settings
from unsloth_patch.tiny import build_model


def _tiny():
    return build_model("llama", hidden_size=96, intermediate_size=200, num_heads=4, num_kv_heads=2, num_layers=1)


def _forwards(model):
    return [vars(m).get("forward") for m in model.modules()]


def test_off_fuses_nothing():
    model = _tiny()
    before = _forwards(model)
    report = fuse_model_layers(model, Settings(kernels="off"), Edits(), force=True)
    assert report["fused"] == {} and "UNSLOTH_PATCH_KERNELS=off" in report["reason"]
    assert _forwards(model) == before


def test_cpu_model_is_left_alone(monkeypatch):
    monkeypatch.setattr(layers, "_triton_available", lambda: True)
    model = _tiny()
    before = _forwards(model)
    report = fuse_model_layers(model, Settings(), Edits())
    assert report["fused"] == {} and "cpu" in report["reason"]
    assert _forwards(model) == before and last_fusion() == report


def test_without_triton_nothing_is_fused(monkeypatch):
    monkeypatch.setattr(layers, "_triton_available", lambda: False)
    assert "Triton" in fuse_model_layers(_tiny(), Settings(), Edits(), force=True)["reason"]


def test_non_cuda_parameters_are_refused():
    class Fake(nn.Module):
        def parameters(self, recurse=True):
            yield torch.empty(2, dtype=torch.float64, device="meta")

    assert "parameters on meta" in layers._model_reason(Fake())
    model = _tiny().to(torch.float64)
    assert "cpu" in layers._model_reason(model)


def test_activation_recognised_by_behaviour():
    from transformers.activations import ACT2FN

    assert layers._activation_kind(ACT2FN["silu"]) == "silu"
    assert layers._activation_kind(nn.SiLU()) == "silu"
    assert layers._activation_kind(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert layers._activation_kind(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert layers._activation_kind(nn.GELU()) is None  # exact erf GELU differs
    assert layers._activation_kind(nn.ReLU()) is None
    assert layers._activation_kind("silu") is None


class PlainMLP(nn.Module):
    def __init__(self, act=None):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = act or nn.SiLU()

    def forward(self, hidden):
        """A docstring does not matter."""
        return self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))


class ScaledMLP(PlainMLP):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 2


class SwappedMLP(PlainMLP):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_mlp_recognised_by_its_forward():
    from transformers.models.llama.modeling_llama import LlamaMLP

    from unsloth_patch.versions import at_least

    # older transformers (4.46 in the matrix) have a tensor-parallel branch in LlamaMLP.forward: not the
    # plain form, so it is left alone
    assert layers._standard_gated_forward(LlamaMLP) == at_least("transformers", "4.51")
    assert layers._mlp_activation(PlainMLP()) == ("silu", "")
    assert layers._mlp_activation(PlainMLP(nn.GELU(approximate="tanh"))) == ("gelu_tanh", "")
    for module in (ScaledMLP(), SwappedMLP(), PlainMLP(nn.ReLU())):
        kind, why = layers._mlp_activation(module)
        assert kind is None and why


class OddRMSNorm(nn.Module):
    """Named like an RMSNorm, but subtracts the mean first."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class GatedRMSNorm(OddRMSNorm):
    def forward(self, x, gate=None):
        return x


def test_rmsnorm_recognised_by_behaviour():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    llama = LlamaRMSNorm(40, eps=1e-5)
    gemma = GemmaRMSNorm(40)
    with torch.no_grad():
        llama.weight.normal_()
        gemma.weight.normal_()
    assert layers._rmsnorm_offset(llama) == (0.0, "")
    assert layers._rmsnorm_offset(gemma) == (1.0, "")
    assert layers._rmsnorm_offset(OddRMSNorm(40))[0] is None
    assert layers._rmsnorm_offset(GatedRMSNorm(40))[1] == "forward is not norm(x)"
    norm = LlamaRMSNorm(40)
    del norm.variance_epsilon
    assert layers._rmsnorm_offset(norm) == (None, "no variance_epsilon/eps")


@pytest.mark.kernels
def test_unrecognised_modules_are_skipped_and_reported():
    pytest.importorskip("triton")
    model = nn.ModuleDict({"mlp": PlainMLP(), "scaled": ScaledMLP(), "norm": OddRMSNorm(8)})
    edits = Edits()
    report = fuse_model_layers(model, Settings(), edits, force=True)
    assert report["fused"] == {"swiglu": 1}
    assert set(report["skipped"]) == {"scaled", "norm"}
    edits.rollback()
    assert "forward" not in vars(model["mlp"])


def test_an_error_rolls_back_only_the_fusion(monkeypatch):
    monkeypatch.setattr(layers, "_triton_available", lambda: True)
    model = _tiny()
    outer = Edits()
    marker = nn.Module()
    outer.setattr(marker, "flag", True)
    calls = {"n": 0}
    real = layers._rmsnorm_offset

    def flaky(module):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(module)

    monkeypatch.setattr(layers, "_rmsnorm_offset", flaky)
    before = _forwards(model)
    report = fuse_model_layers(model, Settings(), outer, force=True)
    assert report["fused"] == {} and "boom" in report["reason"]
    assert _forwards(model) == before
    assert marker.flag is True  # the caller's own edits are untouched
    outer.rollback()
    assert not hasattr(marker, "flag")


def test_trainer_records_the_fusion_decision(tmp_path):
    pytest.importorskip("trl")
    import unsloth_patch
    from unsloth_patch.tiny import build_tokenizer

    from .helpers import sft_config, sft_trainer, text_dataset

    unsloth_patch.apply()
    tokenizer = build_tokenizer()
    model = build_model("llama", vocab_size=len(tokenizer))
    layers._last.update(reason="not run yet")
    trainer = sft_trainer(model, tokenizer, text_dataset(tokenizer, limit=8), sft_config(tmp_path, max_steps=1))
    assert last_fusion()["reason"] == "not run yet"  # fusion belongs to train(), not to the constructor
    trainer.train()
    reason = last_fusion()["reason"]
    assert "cpu" in reason or "Triton" in reason
    assert not any(layers.is_fused(m) for m in model.modules())
