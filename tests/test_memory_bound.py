"""The no-checkpointing upper bound: above every peak measured on the GPU, and the probe it saves.

A roomy card chooses ``none`` from arithmetic alone when the bound plus the optimizer state fits
the budget; the probe runs whenever the bound does not fit or cannot be made.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import unsloth_patch  # noqa: E402
from unsloth_patch import checkpointing as policy  # noqa: E402
from unsloth_patch import tiny  # noqa: E402
from unsloth_patch.patches import checkpointing as wiring  # noqa: E402
from unsloth_patch.patches.step_shape import step_shape  # noqa: E402

from .helpers import sft_trainer, text_dataset  # noqa: E402
from .test_checkpointing import _config, _no_probe  # noqa: E402

unsloth_patch.apply()
settings_module = sys.modules["unsloth_patch.settings"]


# The benchmark's models (unsloth_patch.tiny.build_llama_1b_config / build_qwen3_1b_config), as numbers:
# Qwen3's config class does not exist in every transformers of the matrix.
MODELS = {
    "llama": dict(model_type="llama", layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64,
                  vocab=32000),
    "qwen3": dict(model_type="qwen3", layers=16, hidden=2048, intermediate=6144, heads=16, kv_heads=8, head_dim=128,
                  vocab=32000),
}


def _shape(model, tokens, *, params, trainable, **overrides):
    values = dict(MODELS[model], attention="unsloth_varlen", tokens=tokens, activation_bytes=2,
                  resident_bytes=2 * params, gradient_bytes=2 * trainable)
    values.update(overrides)
    return policy.StepShape(**values)


def test_the_numbers_are_the_benchmarks_llama():
    config = tiny.build_llama_1b_config()
    assert MODELS["llama"] == dict(model_type=config.model_type, layers=config.num_hidden_layers,
                                   hidden=config.hidden_size, intermediate=config.intermediate_size,
                                   heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                                   vocab=config.vocab_size)


# Whole-run peaks (torch.cuda.max_memory_allocated over train(), optimizer state included) and the
# optimizer state of runs on an H200, 2026-12-02 (benchmarks/results/h200-2026-12-02*/): bf16, batch 8,
# max_length 2048 (16,384 tokens in the largest batch), no checkpointing.
RECORDED = [
    # (model, LoRA, parameters, trainable parameters, whole-run peak bytes, optimizer state bytes)
    ("llama", False, 1_104_218_112, 1_104_218_112, 22_071_951_872, 4_416_873_036),  # unsloth_patch
    ("llama", False, 1_104_218_112, 1_104_218_112, 27_595_837_440, 4_416_873_036),  # unsloth_patch_packing
    ("llama", True, 1_115_490_304, 11_272_192, 20_830_896_128, 90_177_600),  # unsloth_patch_lora
    ("qwen3", False, 936_450_048, 936_450_048, 20_310_896_640, 3_745_800_192),  # unsloth_patch, qwen3
]


# On an H100, 2026-12-06 (benchmarks/results/h100-2026-12-06/call1/): LoRA r=16 with every LoRA layer's input
# kept in the compute dtype (lora_inputs) and fused (lora_fusion), no checkpointing, same workload.
RECORDED_SHARED_INPUTS = [("llama", True, 1_115_490_304, 11_272_192, 17_452_773_888, 90_178_432)]
LORA_RANK_BYTES = 16 * 7 * 16 * 4  # 16 layers x 7 adapted projections x rank 16, counted in float32


@pytest.mark.parametrize("model, lora, params, trainable, peak, optimizer", RECORDED)
def test_the_bound_is_above_every_recorded_peak(model, lora, params, trainable, peak, optimizer):
    shape = _shape(model, 16_384, params=params, trainable=trainable, lora=lora)
    bound = policy.upper_bound(shape)
    assert bound is not None
    assert bound + optimizer >= peak, (bound + optimizer, peak)


@pytest.mark.parametrize("model, lora, params, trainable, peak, optimizer", RECORDED_SHARED_INPUTS)
def test_without_input_copies_the_lora_bound_is_still_above_the_recorded_peak(model, lora, params, trainable,
                                                                             peak, optimizer):
    shape = _shape(model, 16_384, params=params, trainable=trainable, lora=lora, lora_input_copies=False,
                   lora_rank_bytes=LORA_RANK_BYTES)
    assert policy.upper_bound(shape) + optimizer >= peak


def test_an_80_gb_card_needs_no_probe_for_lora_whose_adapters_read_the_base_inputs():
    lora = _shape("llama", 16_384, params=1_115_490_304, trainable=11_272_192, lora=True,
                  lora_rank_bytes=LORA_RANK_BYTES)
    budget = policy.budget_for(80 * 10**9, None)
    assert policy.upper_bound(lora) + 90_178_432 > budget  # copies counted: probed (2.0-2.4 s on an H100)
    shared = dataclasses.replace(lora, lora_input_copies=False)
    assert policy.upper_bound(shared) + 90_178_432 <= budget


def test_an_80_gb_card_needs_no_probe_for_the_reference_workload():
    shape = _shape("llama", 16_384, params=1_104_218_112, trainable=1_104_218_112)
    budget = policy.budget_for(80 * 10**9, None)
    assert policy.upper_bound(shape) + 4_416_873_036 <= budget


# On an H100, 2026-12-07 (benchmarks/results/gpu-2026-12-07-b/callC/llama-unsloth_patch_qlora-cold.json): QLoRA (nf4,
# double quantisation, bf16 compute) r=16, fused LoRA layers, no checkpointing. The whole run's peak at the largest
# batch it drew (11,897 tokens), and the probe's steps without checkpointing (4,096 and 8,192 tokens), each with the
# tokens of its batch. The model and its LoRA gradients held 876,697,600 bytes; the optimizer state 45,089,664.
QLORA_TRAINABLE_BYTES = 22_544_832  # the LoRA parameters in bf16
QLORA_RESIDENT = 876_697_600 - QLORA_TRAINABLE_BYTES
QLORA_DEQUANT = 2 * 8 * 2048 * 8192 * 2  # twice the eight largest dense weights (the MLP's), bf16
RECORDED_4BIT = [(11_897, 15_921_575_424, 45_089_664), (8_192, 11_277_370_368, 0), (4_096, 6_202_602_496, 0)]


def _qlora_shape(tokens):
    return policy.StepShape(**dict(MODELS["llama"], attention="unsloth_varlen", tokens=tokens, activation_bytes=2,
                                   resident_bytes=QLORA_RESIDENT, gradient_bytes=QLORA_TRAINABLE_BYTES, lora=True,
                                   lora_input_copies=False, lora_rank_bytes=LORA_RANK_BYTES, quantized=True,
                                   quantization="4bit", dequant_bytes=QLORA_DEQUANT))


@pytest.mark.parametrize("tokens, peak, optimizer", RECORDED_4BIT)
def test_the_4bit_bound_is_above_every_recorded_qlora_peak(tokens, peak, optimizer):
    assert policy.why_not_bounded(_qlora_shape(tokens)) is None
    assert policy.upper_bound(_qlora_shape(tokens)) + optimizer >= peak


def test_an_80_gb_card_needs_no_probe_for_qlora():
    """The probe took 4.8 s of the 2026-12-07 QLoRA run's 5.3 s start-up, on an 80 GB card where the run held 14.8 GiB."""
    budget = policy.budget_for(80 * 10**9, None)
    assert policy.upper_bound(_qlora_shape(16_384)) + 45_089_664 <= budget
    other = dataclasses.replace(_qlora_shape(16_384), quantization="other")
    assert "other than bitsandbytes 4-bit" in policy.why_not_bounded(other) and policy.upper_bound(other) is None
    bigger = dataclasses.replace(_qlora_shape(16_384), dequant_bytes=2 * QLORA_DEQUANT)
    assert policy.upper_bound(bigger) > policy.upper_bound(_qlora_shape(16_384))  # the dense copies are counted


def test_the_bound_grows_with_tokens_and_lora():
    small = _shape("llama", 4096, params=10**9, trainable=10**9)
    assert policy.upper_bound(dataclasses.replace(small, tokens=8192)) > policy.upper_bound(small)
    assert policy.upper_bound(dataclasses.replace(small, lora=True)) > policy.upper_bound(small)
    shared = dataclasses.replace(small, lora=True, lora_input_copies=False)
    assert policy.upper_bound(shared) == policy.upper_bound(small)  # the adapters keep the base's own inputs
    assert policy.upper_bound(dataclasses.replace(shared, lora_rank_bytes=64)) > policy.upper_bound(small)


@pytest.mark.parametrize("change, reason", [
    (dict(model_type="mixtral"), "not one of the dense layouts"),
    (dict(experts=8), "mixture of experts"),
    (dict(quantized=True), "quantized weights other than bitsandbytes 4-bit"),
    (dict(quantized=True, quantization="other"), "quantized weights other than bitsandbytes 4-bit"),
    (dict(attention="sdpa"), "tokens x tokens"),
    (dict(attention="eager"), "tokens x tokens"),
    (dict(vocab=0), "lacks a size"),
])
def test_shapes_the_bound_does_not_cover_say_why(change, reason):
    shape = dataclasses.replace(_shape("llama", 1024, params=10**9, trainable=10**9), **change)
    assert reason in policy.why_not_bounded(shape)
    assert policy.upper_bound(shape) is None


# --------------------------------------------------------------------------- facts and wiring


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=16)


def _trainer(tokenizer, dataset, config, **kwargs):
    model = tiny.build_model("llama", vocab_size=len(tokenizer), seed=0)
    return sft_trainer(model, tokenizer, dataset, config, **kwargs)


def test_step_shape_reads_the_model_and_the_batch(tokenizer, dataset, tmp_path):
    trainer = _trainer(tokenizer, dataset, _config(tmp_path))
    spec = wiring.probe_spec(trainer)
    shape = step_shape(trainer, spec, None)
    config = trainer.model.config
    assert (shape.model_type, shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.vocab) == (
        "llama", config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
        config.num_key_value_heads, config.vocab_size)
    assert shape.tokens == sum(spec.lengths) > 0
    params = list(trainer.model.parameters())
    assert shape.gradient_bytes == sum(p.numel() * p.element_size() for p in params)
    assert shape.activation_bytes == params[0].element_size() and not shape.lora and not shape.quantized
    assert step_shape(trainer, spec, "bf16").activation_bytes == 2


def _lora_model(tokenizer, dropout=0.0, dtype=torch.bfloat16):
    from peft import LoraConfig, get_peft_model

    model = tiny.build_model("llama", vocab_size=len(tokenizer), seed=0).to(dtype)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))


def test_step_shape_counts_lora_input_copies_unless_every_layer_reads_its_base_input(tokenizer, dataset, tmp_path):
    from unsloth_patch import lora_inputs
    from unsloth_patch.edits import Edits

    trainer = _trainer(tokenizer, dataset, _config(tmp_path))
    spec = wiring.probe_spec(trainer)
    for dropout, dtype in ((0.0, torch.bfloat16), (0.1, torch.bfloat16), (0.0, torch.float32)):
        trainer.model = _lora_model(tokenizer, dropout, dtype)
        layers = [m for m in trainer.model.modules() if lora_inputs.is_lora_layer(m)]
        shape = step_shape(trainer, spec, "bf16")
        assert shape.lora and shape.lora_input_copies  # PEFT's own cast: copies
        assert shape.lora_rank_bytes == 4 * 4 * len(layers)  # rank 4, counted in float32
        edits = Edits()
        outcome = lora_inputs.keep_input_dtype(trainer.model, edits)
        try:
            edited = step_shape(trainer, spec, "bf16")
            # dropout: left to PEFT; float32 weights under bf16 autocast: autocast casts each adapter's input
            assert edited.lora_input_copies is (dropout > 0 or dtype != torch.bfloat16), outcome
            assert step_shape(trainer, spec, None).lora_input_copies  # no autocast: PEFT's cast may copy
        finally:
            edits.rollback()
        assert step_shape(trainer, spec, "bf16").lora_input_copies  # the edit rolled back: copies again


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_step_shape_bounds_a_4bit_base_and_counts_its_dense_copies(dropout):
    from types import SimpleNamespace

    from .test_lora_fusion import _qlora_model

    model = _qlora_model()  # nf4 with double quantisation, bf16 compute; skips without bitsandbytes
    if dropout:
        for module in model.modules():
            if hasattr(module, "lora_dropout"):
                for name in list(module.lora_dropout):
                    module.lora_dropout[name] = torch.nn.Dropout(dropout)
    shape = step_shape(SimpleNamespace(model=model), SimpleNamespace(lengths=[64, 32]), "bf16")
    assert shape.quantized and shape.quantization == "4bit"
    assert policy.why_not_bounded(dataclasses.replace(shape, attention="unsloth_varlen")) is None  # as in train()
    dense = sorted(m.base_layer.weight.quant_state.shape.numel() for m in model.modules()
                   if hasattr(m, "base_layer") and hasattr(m.base_layer.weight, "quant_state"))
    states = [m.base_layer.weight.quant_state for m in model.modules()
              if hasattr(m, "base_layer") and hasattr(m.base_layer.weight, "quant_state")]
    scales = sum(-(-s.shape.numel() // s.blocksize) * 4 for s in states)  # double-quantised scales, kept float32
    assert len(dense) == 14 and all(s.nested for s in states)
    assert shape.dequant_bytes == 2 * sum(dense[-8:]) * 2 + scales
    # PEFT's 4-bit layers hand the input to the adapters as it is under autocast, unless dropout copies it
    assert shape.lora_input_copies is (dropout > 0)
    assert step_shape(SimpleNamespace(model=model), SimpleNamespace(lengths=[64]), None).lora_input_copies


def test_the_probe_decision_sees_this_train_s_lora_input_edit(tokenizer, dataset, tmp_path, monkeypatch):
    """The bound is computed inside ``train()`` after the training edits are on, so a LoRA model whose layers
    all take the edit is bounded without copies."""
    from peft import LoraConfig

    _use_budget(monkeypatch, 64.0)
    seen = []

    def bound_of(trainer, spec, mixed, device):
        shape = dataclasses.replace(step_shape(trainer, spec, "bf16"), attention="unsloth_varlen")
        seen.append(shape.lora_input_copies)
        return policy.upper_bound(shape), "", shape.dense_4bit_bytes

    monkeypatch.setattr(wiring, "bound_of", bound_of)
    _no_probe(monkeypatch)
    model = tiny.build_model("llama", vocab_size=len(tokenizer), seed=0).to(torch.bfloat16)
    trainer = sft_trainer(model, tokenizer, dataset, _config(tmp_path, max_steps=1),
                          peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    trainer.train()
    assert seen == [False]
    assert policy.last_decision().policy == "none"


def _use_budget(monkeypatch, gib):
    monkeypatch.setattr(settings_module, "_current",
                        dataclasses.replace(settings_module.current(), memory_budget_gb=gib))


def _bound_as_on_cuda(monkeypatch):
    """The CPU runs the bound as a CUDA device would, with attention that keeps O(tokens)."""
    def bound_of(trainer, spec, mixed, device):
        shape = dataclasses.replace(step_shape(trainer, spec, mixed), attention="unsloth_varlen")
        return policy.upper_bound(shape), "", shape.dense_4bit_bytes

    monkeypatch.setattr(wiring, "bound_of", bound_of)
    return bound_of


def test_a_roomy_budget_chooses_none_without_a_probe(tokenizer, dataset, tmp_path, monkeypatch):
    _use_budget(monkeypatch, 64.0)
    _bound_as_on_cuda(monkeypatch)
    _no_probe(monkeypatch)
    trainer = _trainer(tokenizer, dataset, _config(tmp_path, max_steps=1))
    trainer.train()
    decision = policy.last_decision()
    assert decision.policy == "none" and decision.changes_training, decision.summary()
    assert "no probe needed" in decision.reason and decision.peaks == {}
    assert 0 < decision.bound_bytes and decision.bound_bytes + decision.extra_bytes <= decision.budget_bytes
    assert "upper bound without checkpointing" in decision.summary()
    assert wiring.checkpointing_on(trainer.args)  # the user's arguments are back after train()


def test_a_bound_over_the_budget_leaves_the_choice_to_the_probe(tokenizer, dataset, tmp_path, monkeypatch):
    trainer = _trainer(tokenizer, dataset, _config(tmp_path, max_steps=1))
    spec = wiring.probe_spec(trainer)
    bound = _bound_as_on_cuda(monkeypatch)(trainer, spec, None, None)[0]
    _use_budget(monkeypatch, (bound + wiring.extra_bytes(trainer)) * 0.999 / policy.GIB)
    measured = []
    real = policy.measure
    monkeypatch.setattr(policy, "measure", lambda *a, **k: measured.append(1) or real(*a, **k))
    trainer.train()
    decision = policy.last_decision()
    assert measured, "the probe must run when the bound does not fit"
    assert decision.peaks and "none" in decision.peaks
    assert decision.bound_bytes == bound and "does not fit" in decision.bound_note


def test_on_a_cpu_the_bound_is_not_used(tokenizer, dataset, tmp_path):
    trainer = _trainer(tokenizer, dataset, _config(tmp_path))
    bound, note, copies = wiring.bound_of(trainer, wiring.probe_spec(trainer), None, torch.device("cpu"))
    assert bound is None and "CUDA" in note and copies == 0


# --------------------------------------------------------------------------- what appears after the probe, per launch


def _launched(world_size, fsdp=False, optim="adamw_torch"):
    """A stand-in trainer: the attributes ``extra_bytes`` reads, for a 2-layer model with one frozen layer."""
    import types

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)).to(torch.bfloat16)
    model[1].requires_grad_(False)
    args = types.SimpleNamespace(world_size=world_size, optim=optim)
    return types.SimpleNamespace(model=model, args=args, is_fsdp_enabled=fsdp)


def test_later_memory_counts_the_optimizer_state_and_under_ddp_one_more_gradient_copy():
    trainable = (64 * 32 + 32) * 2  # bytes of the trainable bf16 parameters (= their gradients)
    one_gpu = wiring.extra_bytes(_launched(1))
    # AdamW: two moments of each parameter's dtype and a float32 step per parameter tensor
    assert one_gpu == policy.optimizer_state_bytes([((32, 64), 2), ((32,), 2)], "adamw_torch") == 2 * trainable + 2 * 4
    assert wiring.extra_bytes(_launched(2)) == one_gpu + trainable  # DDP's gradient buckets: a flat copy each rank
    assert wiring.extra_bytes(_launched(8)) == one_gpu + trainable  # per rank, whatever the world size
    assert wiring.extra_bytes(_launched(2, fsdp=True)) == one_gpu  # FSDP shards instead: no buckets
    assert wiring.extra_bytes(_launched(2, optim="sgd")) == trainable  # SGD without momentum keeps no state
