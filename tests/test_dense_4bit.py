"""QLoRA's 4-bit weights kept dense for one ``train()``: only where ``none`` was chosen from the bound without a
probe and the bound, the optimizer state and the copies fit the budget; each copy bitsandbytes' own
dequantisation, made once, remade after an in-place change, never kept under inference mode; all gone
when ``train()`` returns, with the losses of a run that dequantises on every call.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import unsloth_patch  # noqa: E402  (activates the patches before TRL/transformers load)
from unsloth_patch import checkpointing as policy  # noqa: E402
from unsloth_patch.checkpointing import dense_4bit  # noqa: E402
from unsloth_patch.kernels import projection  # noqa: E402
from unsloth_patch.patches import checkpointing as wiring  # noqa: E402

from .helpers import losses, sft_trainer, text_dataset  # noqa: E402
from .test_checkpointing import _config, _no_probe  # noqa: E402
from .test_memory_bound import _bound_as_on_cuda, _use_budget  # noqa: E402

unsloth_patch.apply()
settings_module = sys.modules["unsloth_patch.settings"]
GIB = policy.GIB
SEEDS = [3, 17, 29]


@pytest.fixture(autouse=True)
def _not_keeping():
    """No kept copy or keeping flag leaks into or out of a test."""
    projection.keeping_dense(False)
    yield
    projection.keeping_dense(False)


# --------------------------------------------------------------------------- the decision (pure)


def _sizes(seed):
    """(copies, bound, extra): the dense copies, the no-checkpointing bound, the optimizer state, in bytes."""
    rng = random.Random(seed)
    return rng.randint(1 << 20, 4 * GIB), rng.randint(GIB, 40 * GIB), rng.randint(1 << 20, 8 * GIB)


def _gib(n):
    return f"{n / GIB:.2f} GiB"


@pytest.mark.parametrize("seed", SEEDS)
def test_without_4bit_weights_there_is_nothing_to_choose(seed):
    copies, bound, extra = _sizes(seed)
    roomy = 2 * (bound + extra + copies)
    assert dense_4bit.choose(0, bound, extra, roomy) is None
    assert dense_4bit.choose(0, bound, extra, roomy, "turned off") is None
    assert dense_4bit.choose(copies, bound, extra, roomy).keep  # the same sizes with 4-bit weights: kept


@pytest.mark.parametrize("seed", SEEDS)
def test_turned_off_keeps_none_and_says_who_turned_it_off(seed):
    copies, bound, extra = _sizes(seed)
    why = f"turned off by toggle {seed}"
    choice = dense_4bit.choose(copies, bound, extra, 2 * (bound + extra + copies), why)
    assert not choice.keep and why in choice.reason and choice.copies_bytes == copies


@pytest.mark.parametrize("seed", SEEDS)
def test_a_probed_decision_keeps_none(seed):
    copies, _, extra = _sizes(seed)
    choice = dense_4bit.choose(copies, None, extra, 1000 * GIB)  # bound None: the policy came from the probe
    assert not choice.keep and "probed" in choice.reason and choice.copies_bytes == copies


@pytest.mark.parametrize("seed", SEEDS)
def test_copies_over_the_budget_are_not_kept_and_the_reason_gives_the_sizes(seed):
    copies, bound, extra = _sizes(seed)
    need = bound + extra + copies
    budget = bound + extra + random.Random(seed + 1).randint(0, copies - 1)  # none fits, the copies do not
    choice = dense_4bit.choose(copies, bound, extra, budget)
    assert not choice.keep and choice.copies_bytes == copies
    for size in (copies, need, budget):
        assert _gib(size) in choice.reason, (size, choice.reason)
    assert dense_4bit.choose(copies, bound, extra, need).keep  # exactly at the budget: kept


@pytest.mark.parametrize("seed", SEEDS)
def test_copies_that_fit_beside_the_bound_and_the_optimizer_state_are_kept(seed):
    copies, bound, extra = _sizes(seed)
    budget = bound + extra + copies + random.Random(seed + 2).randint(1, 8 * GIB)
    choice = dense_4bit.choose(copies, bound, extra, budget)
    assert choice.keep and choice.copies_bytes == copies
    assert "kept dense" in choice.reason and _gib(copies) in choice.reason and _gib(budget) in choice.reason
    overruled = dense_4bit.overruled(choice, f"reason {seed}")
    assert not overruled.keep and f"reason {seed}" in overruled.reason and overruled.copies_bytes == copies
    not_kept = dense_4bit.choose(copies, None, extra, budget)
    assert dense_4bit.overruled(not_kept, "x") is not_kept and dense_4bit.overruled(None, "x") is None


# --------------------------------------------------------------------------- the kept copies (kernels/projection.py)


def _packed(seed, nested=True, shape=(96, 64)):
    """A bitsandbytes nf4 weight of random values, quantised on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    dense = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=nested)
    return weight._quantize("cpu") if getattr(weight, "quant_state", None) is None else weight


def _counting(monkeypatch):
    calls = []
    real = projection._dequantized
    monkeypatch.setattr(projection, "_dequantized", lambda *a: calls.append(a[2]) or real(*a))
    return calls


def _bitsandbytes(weight, dtype, state=None):
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight.data, weight.quant_state if state is None else state).to(dtype)


@pytest.mark.parametrize("nested", [True, False])
def test_a_kept_weight_is_dequantised_once_bit_for_bit_as_bitsandbytes(nested, monkeypatch):
    weight = _packed(5, nested)
    state, expected = weight.quant_state, _bitsandbytes(weight, torch.bfloat16)
    calls = _counting(monkeypatch)
    projection.keeping_dense(True)
    first = projection.dense_weight(weight, state, torch.bfloat16)
    for _ in range(2):  # the backward, a recomputation: the same copy
        assert projection.dense_weight(weight, state, torch.bfloat16) is first
    assert torch.equal(first, expected) and first.dtype == torch.bfloat16
    assert len(calls) == 1 and projection.kept_dense_count() == 1
    # another dtype replaces the copy (the decision counts one copy per weight), bit for bit again
    assert torch.equal(projection.dense_weight(weight, state, torch.float32), _bitsandbytes(weight, torch.float32))
    assert len(calls) == 2 and projection.kept_dense_count() == 1
    assert torch.equal(projection.dense_weight(weight, state, torch.bfloat16), expected) and len(calls) == 3


def test_an_in_place_change_to_the_packed_weight_makes_a_new_copy(monkeypatch):
    weight = _packed(7)
    state, before = weight.quant_state, _bitsandbytes(weight, torch.bfloat16)
    calls = _counting(monkeypatch)
    projection.keeping_dense(True)
    assert torch.equal(projection.dense_weight(weight, state, torch.bfloat16), before)
    version = weight._version
    with torch.no_grad():
        weight.bitwise_not_()  # other 4-bit codes, the same scales
    assert weight._version > version
    after = _bitsandbytes(weight, torch.bfloat16)
    assert not torch.equal(after, before)
    for _ in range(2):
        assert torch.equal(projection.dense_weight(weight, state, torch.bfloat16), after)
    assert len(calls) == 2 and projection.kept_dense_count() == 1


def test_a_new_packed_tensor_of_the_same_state_gets_its_own_copy_even_at_a_freed_one_s_address(monkeypatch):
    """A reloaded or moved weight: another packed tensor, at version 0, often at the address a freed one had."""
    weight = _packed(9)
    state = weight.quant_state
    calls = _counting(monkeypatch)
    projection.keeping_dense(True)
    projection.dense_weight(weight, state, torch.bfloat16)
    for i in range(6):
        other = torch.tensor((weight.data.flatten() ^ (17 * i + 1)).tolist(), dtype=torch.uint8).view(weight.shape)
        expected = _bitsandbytes(other, torch.bfloat16, state)
        assert not torch.equal(expected, _bitsandbytes(weight, torch.bfloat16))
        for _ in range(2):
            assert torch.equal(projection.dense_weight(other, state, torch.bfloat16), expected), i
        assert projection.kept_dense_count() == 1
        del other
        gc.collect()
        assert projection.kept_dense_count() == 0  # the packed tensor is gone: its copy with it
    assert len(calls) == 7


def test_under_inference_mode_nothing_is_kept(monkeypatch):
    weight = _packed(11)
    state, expected = weight.quant_state, _bitsandbytes(weight, torch.bfloat16)
    calls = _counting(monkeypatch)
    projection.keeping_dense(True)
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(projection.dense_weight(weight, state, torch.bfloat16), expected)
    assert len(calls) == 2 and projection.kept_dense_count() == 0


def test_stopping_lets_every_copy_go_and_later_calls_are_not_kept(monkeypatch):
    weights = [_packed(13 + i, shape=(32 * (i + 1), 64)) for i in range(3)]
    calls = _counting(monkeypatch)
    projection.keeping_dense(True)
    for weight in weights:
        projection.dense_weight(weight, weight.quant_state, torch.bfloat16)
    assert projection.kept_dense_count() == 3 and len(calls) == 3
    projection.keeping_dense(False)
    assert projection.kept_dense_count() == 0
    for _ in range(2):
        got = projection.dense_weight(weights[0], weights[0].quant_state, torch.bfloat16)
        assert torch.equal(got, _bitsandbytes(weights[0], torch.bfloat16))
    assert len(calls) == 5 and projection.kept_dense_count() == 0


# --------------------------------------------------------------------------- the wiring, through SFTTrainer


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=16)


class _Kept:
    """A callback noting how many dense copies are kept at each step's end."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.counts = []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                outer.counts.append(projection.kept_dense_count())

        self.callback = Callback()


def _qlora_trainer(tokenizer, dataset, tmp_path, steps=3):
    """The 2-layer QLoRA model of test_lora_fusion (nf4, double quantisation), bf16 throughout and no autocast, so
    that the LoRA layers run fused, through ``dense_weight``. TRL >= 1.x casts a quantized model's adapters to
    bf16 whatever the model's dtype (float32 ones beside float32 weights would leave the layers to PEFT)."""
    from .test_lora_fusion import _qlora_model

    model = _qlora_model()  # skips without bitsandbytes
    assert model.config.vocab_size == len(tokenizer)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)  # as TRL does: the same on every TRL
    trainer = sft_trainer(model, tokenizer, dataset, _config(tmp_path, max_steps=steps, learning_rate=5e-3))
    kept = _Kept()
    trainer.add_callback(kept.callback)
    return trainer, kept


def _asking(monkeypatch, value="auto"):
    """UNSLOTH_PATCH_DENSE_4BIT for this test, the other settings as they are."""
    monkeypatch.setattr(settings_module, "_current", dataclasses.replace(settings_module.current(), dense_4bit=value))


def _four_bit(model):
    return [p for p in model.parameters() if type(p).__name__ == "Params4bit"]


def _copies(model):
    """The dense copies of every 4-bit weight, in bf16 (the model's and the activations' dtype)."""
    return sum(p.quant_state.shape.numel() for p in _four_bit(model)) * 2


def test_a_roomy_budget_keeps_the_4bit_weights_dense_for_the_run_with_the_same_losses(
        tokenizer, dataset, tmp_path, monkeypatch):
    _use_budget(monkeypatch, 64.0)
    _asking(monkeypatch, "auto")
    _bound_as_on_cuda(monkeypatch)
    _no_probe(monkeypatch)
    trainer, kept = _qlora_trainer(tokenizer, dataset, tmp_path / "kept")
    trainer.train()
    decision = policy.last_decision()
    weights = len(_four_bit(trainer.model))
    assert weights == 14  # 2 layers x 7 projections
    assert decision.policy == "none" and "no probe needed" in decision.reason, decision.summary()
    assert decision.dense_4bit.keep and decision.dense_4bit.copies_bytes == _copies(trainer.model) > 0
    assert decision.dense_4bit.reason in decision.summary() and decision.as_dict()["dense_4bit"]["keep"] is True
    assert kept.counts == [weights] * 3  # every 4-bit weight dense while training
    assert projection.kept_dense_count() == 0 and not projection._KEEP_DENSE[0]  # gone when train() returns
    kept_losses = losses(trainer)

    _asking(monkeypatch, "off")
    trainer, per_call = _qlora_trainer(tokenizer, dataset, tmp_path / "off")
    trainer.train()
    off = policy.last_decision()
    assert off.policy == "none" and not off.dense_4bit.keep
    assert "UNSLOTH_PATCH_DENSE_4BIT=off" in off.dense_4bit.reason
    assert per_call.counts == [0] * 3
    assert len(kept_losses) == 3 and losses(trainer) == kept_losses  # bitsandbytes' own numbers: bit for bit


def test_a_budget_with_room_for_none_but_not_the_copies_keeps_none(tokenizer, dataset, tmp_path, monkeypatch):
    trainer, kept = _qlora_trainer(tokenizer, dataset, tmp_path, steps=1)
    spec = wiring.probe_spec(trainer)
    bound, _, copies = _bound_as_on_cuda(monkeypatch)(trainer, spec, wiring.mixed_precision(trainer), None)
    assert copies == _copies(trainer.model) > 0
    monkeypatch.setattr(wiring, "bound_of", lambda *a: (bound, "", copies))  # as measured before train()
    _use_budget(monkeypatch, (bound + wiring.extra_bytes(trainer) + copies // 2) / GIB)
    _asking(monkeypatch, "auto")
    _no_probe(monkeypatch)
    trainer.train()
    decision = policy.last_decision()
    assert decision.policy == "none", decision.summary()
    assert decision.bound_bytes + decision.extra_bytes <= decision.budget_bytes < \
        decision.bound_bytes + decision.extra_bytes + copies
    assert not decision.dense_4bit.keep and "exceed the budget" in decision.dense_4bit.reason
    assert kept.counts == [0] and projection.kept_dense_count() == 0


def test_ranks_agreeing_on_another_policy_keep_no_copies(tokenizer, dataset, tmp_path, monkeypatch):
    _use_budget(monkeypatch, 64.0)
    _asking(monkeypatch, "auto")
    _bound_as_on_cuda(monkeypatch)
    _no_probe(monkeypatch)
    trainer, _ = _qlora_trainer(tokenizer, dataset, tmp_path, steps=1)
    alone = wiring.decide(trainer, settings_module.current())
    assert alone.policy == "none" and alone.dense_4bit.keep
    monkeypatch.setattr(policy, "agree_across_ranks", lambda index: policy.POLICIES.index("mlp_recompute"))
    agreed = wiring.decide(trainer, settings_module.current())
    assert agreed.policy == "mlp_recompute" and agreed.local_policy == "none"
    assert not agreed.dense_4bit.keep and "ranks agreed on mlp_recompute" in agreed.dense_4bit.reason
    assert agreed.dense_4bit.copies_bytes == alone.dense_4bit.copies_bytes


def test_keeping_is_on_by_default_can_be_turned_off_and_needs_the_fused_lora_layers():
    from unsloth_patch.settings import Settings, read_settings

    assert Settings().dense_4bit == "auto" and read_settings({}).dense_4bit == "auto"
    assert read_settings({"UNSLOTH_PATCH_DENSE_4BIT": "off"}).dense_4bit == "off"
    with pytest.raises(ValueError, match="UNSLOTH_PATCH_DENSE_4BIT='always'.*auto, off"):
        read_settings({"UNSLOTH_PATCH_DENSE_4BIT": "always"})
    assert wiring.dense_off_reason(Settings()) is None  # the room decides
    assert "UNSLOTH_PATCH_DENSE_4BIT=off" in wiring.dense_off_reason(Settings(dense_4bit="off"))
    for lora_off in (Settings(dense_4bit="auto", kernels="off"), Settings(dense_4bit="auto", kernels_off=("lora",))):
        assert "fused LoRA layers" in wiring.dense_off_reason(lora_off)
