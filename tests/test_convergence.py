"""Convergence: 30 SFTTrainer steps of a mini model of each family on every kernel of ours against none.

The fused run trains on our Triton kernels (RMSNorm, the gated MLP, RoPE and the varlen attention, in
the interpreter on a CPU); the reference run is the same plugin with ``UNSLOTH_PATCH_KERNELS=off``, where
padding-free batches attend through the boundary-correct masked path in plain PyTorch. fp32 (TRL 1.x
defaults to bf16 autocast, where eager and fused round at different points), padding-free rows with
restarting ``position_ids``, TRL's default gradient checkpointing: every logged loss within 1e-4 relative.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from unsloth_patch import fallback, layers  # noqa: E402
from unsloth_patch.attention import backends  # noqa: E402
from unsloth_patch.tiny import available_families, build_model  # noqa: E402

from .helpers import fresh_fallbacks, fusion_on_this_cpu, losses, sft_config, sft_trainer, text_dataset, use_settings  # noqa: E402,F401

pytestmark = pytest.mark.kernels
STEPS = 30


@pytest.mark.parametrize("family", available_families())
def test_thirty_steps_on_our_kernels_match_the_plain_run(family, tokenizer, tmp_path, monkeypatch, use_settings,
                                                         fusion_on_this_cpu):  # noqa: F811
    import unsloth_patch

    unsloth_patch.apply()
    chosen = []
    real_choose = backends.choose

    def choose(preference, device, dtype, head_dim, window=None, softcap=None, dropout=0.0):
        if preference == "auto" and not dropout and head_dim in (64, 80, 96, 128, 256):
            chosen.append("triton")  # the interpreter runs the kernel on CPU tensors
            return "triton"
        chosen.append(real_choose(preference, device, dtype, head_dim, window, softcap, dropout))
        return chosen[-1]

    dataset = text_dataset(tokenizer, limit=2 * STEPS)
    config = dict(max_length=32, max_steps=STEPS, learning_rate=3e-3, per_device_train_batch_size=2, bf16=False)
    runs, fused = {}, {}
    for name, kernels in (("plain", "off"), ("fused", "auto")):
        use_settings(padding_free="on", kernels=kernels)
        monkeypatch.setattr(backends, "choose", choose if kernels == "auto" else real_choose)
        chosen.clear()
        # head dim 64, as the attention kernel needs; gemma2's local window shorter than the rows
        model = build_model(family, vocab_size=len(tokenizer), hidden_size=64, num_heads=1, num_kv_heads=1,
                            intermediate_size=80, sliding_window=8 if family == "gemma2" else None, seed=0)
        trainer = sft_trainer(model, tokenizer, dataset, sft_config(tmp_path / name, **config))
        trainer.train()
        runs[name] = losses(trainer)
        fused[name] = (dict(layers.last_fusion()["fused"]), sorted(set(chosen)))
    assert fused["plain"] == ({}, [])  # no layer fused, attention through the masked path only
    assert fused["fused"][1] == ["triton"], fused
    kinds = fused["fused"][0]  # per family: llama's RMSNorm and SwiGLU, gemma's offset norm and GeGLU
    norms = kinds.get("rmsnorm", 0) + kinds.get("rmsnorm_gemma", 0)
    assert norms >= 5 and kinds.get("swiglu", 0) + kinds.get("geglu", 0) == 2 and kinds.get("rope") == 2, kinds
    assert len(runs["fused"]) == len(runs["plain"]) == STEPS
    for step, (a, b) in enumerate(zip(runs["plain"], runs["fused"])):
        assert abs(a - b) <= 1e-4 * abs(a), (family, step, runs)
    assert runs["fused"][-1] < runs["fused"][0]  # it trained
    assert fallback.failures() == {}  # no kernel fell back to PyTorch on the way


@pytest.mark.newest_only  # a minute of CPU compilation; the contract does not depend on the TRL version
def test_torch_compile_trains_on_our_kernels_with_the_eager_losses(tokenizer, tmp_path, monkeypatch, use_settings,
                                                                    fusion_on_this_cpu):  # noqa: F811
    """``SFTConfig(torch_compile=True)`` with the kernels fused: the compiled graph calls our custom ops
    (their fake implementations trace it, their bodies run it) and trains with the eager run's losses."""
    from trl import SFTConfig

    import unsloth_patch
    from unsloth_patch.kernels import _guard

    from .helpers import config_fields

    if "torch_compile" not in config_fields(SFTConfig):
        pytest.skip("this TRL has no torch_compile")
    unsloth_patch.apply()
    use_settings(padding_free="on")
    real_run = _guard.run
    monkeypatch.setattr(backends, "choose", lambda *args, **kwargs: "triton")  # the interpreter runs it on a CPU
    launched = []

    def counted(name, *args):
        frame, through_op = sys._getframe(1), False  # reached through the torch.library dispatcher?
        while frame is not None and not through_op:
            through_op = frame.f_code.co_filename.endswith(os.path.join("_library", "custom_ops.py"))
            frame = frame.f_back
        launched.append((name, through_op))
        return real_run(name, *args)

    monkeypatch.setattr(_guard, "run", counted)
    dataset = text_dataset(tokenizer, limit=12)
    runs, kernels, ways = {}, {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()
        launched.clear()
        model = build_model("llama", vocab_size=len(tokenizer), hidden_size=64, num_heads=1, num_kv_heads=1,
                            intermediate_size=80, seed=0)
        trainer = sft_trainer(model, tokenizer, dataset, sft_config(
            tmp_path / str(compiled), max_length=32, max_steps=4, learning_rate=3e-3, per_device_train_batch_size=2,
            bf16=False, torch_compile=compiled))
        trainer.train()
        runs[compiled], kernels[compiled] = losses(trainer), {name for name, _ in launched}
        ways[compiled] = {through_op for _, through_op in launched}
    eager = {"RMSNorm kernel", "gated activation kernel", "RoPE kernel", "varlen attention kernel"}
    # under torch.compile the attention forward runs as the class wrote it: inductor fuses its RoPE itself
    assert kernels[False] == eager and kernels[True] == eager - {"RoPE kernel"}, kernels
    assert ways == {False: {False}, True: {True}}  # eager: the bodies directly; compiled: only through the ops
    assert len(runs[True]) == len(runs[False]) == 4
    for a, b in zip(runs[False], runs[True]):
        assert abs(a - b) <= 1e-4 * abs(a), runs
    assert fallback.failures() == {}
