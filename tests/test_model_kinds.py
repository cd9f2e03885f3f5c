"""Model kinds off the benchmark's path train exactly as stock: attention sinks, PEFT prompt learning,
MoE routers after the checkpointing probe; and ``auto`` never picks a path slower than stock.

Tiny local models of each kind; every case compares the plugin's run with the stock run.
"""

from __future__ import annotations

import pytest
import torch

import unsloth_patch
from unsloth_patch.collate import PaddingFreeCollator, boundaries_from_lengths
from unsloth_patch.errors import UnslothPatchError
from unsloth_patch.patches import checkpointing as wiring
from unsloth_patch.tiny import PAD_ID, BOS_ID, EOS_ID, build_model

from .helpers import losses, sft_config, sft_trainer, text_dataset, train_collator, use_settings  # noqa: F401

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=16)


def _ids(**extra):
    return dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, **extra)


def gpt_oss(vocab):
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no GPT-OSS")
    config = transformers.GptOssConfig(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=8, **_ids())
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_()  # sinks that matter
    return model


def qwen3_moe(vocab):
    if not hasattr(transformers, "Qwen3MoeConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-MoE")
    config = transformers.Qwen3MoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=32,
                                         moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                         output_router_logits=True, **_ids())
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _stock_and_ours(make_trainer):
    unsloth_patch.remove()
    try:
        stock = make_trainer("stock")
        stock.train()
    finally:
        unsloth_patch.apply()
    ours = make_trainer("ours")
    plan = unsloth_patch.last_plan()
    ours.train()
    return stock, ours, plan


def _same_losses(stock, ours, rel=1e-4):
    expected, got = losses(stock), losses(ours)
    assert len(got) == len(expected) > 0
    for a, b in zip(expected, got):
        assert abs(a - b) <= rel * abs(a), (expected, got)


# -- attention sinks ---------------------------------------------------------------------------------

def test_attention_sinks_keep_the_models_own_attention_and_train(tokenizer, dataset, tmp_path):
    def make(name):
        return sft_trainer(gpt_oss(len(tokenizer)), tokenizer, dataset,
                           sft_config(tmp_path / name, max_length=48, max_steps=2))

    stock, ours, plan = _stock_and_ours(make)
    assert not plan.padding_free and "s_aux" in plan.padding_free_reason and "sinks" in plan.padding_free_reason
    assert not isinstance(train_collator(ours), PaddingFreeCollator)
    _same_losses(stock, ours)
    before = gpt_oss(len(tokenizer)).model.layers[0].self_attn.sinks
    assert not torch.equal(ours.model.model.layers[0].self_attn.sinks.detach(), before)  # the sinks trained


def test_attention_sinks_and_padding_free_on_is_a_clear_error(tokenizer, dataset, tmp_path, use_settings):
    use_settings(padding_free="on")
    with pytest.raises(UnslothPatchError, match="sinks"):
        sft_trainer(gpt_oss(len(tokenizer)), tokenizer, dataset, sft_config(tmp_path, max_length=48))


def test_a_flat_batch_that_reaches_a_sink_model_is_still_exact(tokenizer):
    """The safety net: were such a model ever switched to our attention, each sequence runs its own."""
    from unsloth_patch.attention import dispatch

    if not hasattr(transformers, "AttentionInterface") and not hasattr(transformers.modeling_utils,
                                                                       "AttentionInterface"):
        pytest.skip("no AttentionInterface")
    model = gpt_oss(len(tokenizer)).eval()
    original = model.config._attn_implementation
    lengths = (7, 1, 12)
    ids = torch.randint(6, len(tokenizer), (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        own = [model(input_ids=ids[:, a:b]).logits[0] for a, b in ((0, 7), (7, 8), (8, 20))]
        dispatch.remember_original(model.config, original)
        try:
            model.set_attn_implementation(dispatch.NAME)
            flat = model(input_ids=ids, position_ids=positions, **boundaries_from_lengths(lengths)).logits[0]
        finally:
            model.set_attn_implementation(original)
            dispatch.forget_original(model.config)
    assert (flat - torch.cat(own)).abs().max().item() <= 1e-5


# -- PEFT prompt learning --------------------------------------------------------------------------

PROMPT_LEARNING = ["prompt_tuning", "prefix_tuning", "prompt_encoder"]


def _no_checkpointing():
    from trl import SFTConfig

    from .helpers import config_fields

    return {"gradient_checkpointing": False} if "gradient_checkpointing" in config_fields(SFTConfig) else {}


def _prompt_config(kind):
    peft = pytest.importorskip("peft")
    if kind == "prompt_tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    if kind == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16)


@pytest.mark.parametrize("kind", PROMPT_LEARNING)
def test_prompt_learning_keeps_padded_batches_and_trains_as_stock(kind, tokenizer, dataset, tmp_path, use_settings):
    use_settings(padding_free="auto")

    def make(name):
        return sft_trainer(build_model("llama", vocab_size=len(tokenizer), seed=0), tokenizer, dataset,
                           sft_config(tmp_path / name, max_length=48, max_steps=2, learning_rate=1e-3,
                                      **_no_checkpointing()),  # stock prefix tuning fails under checkpointing
                           peft_config=_prompt_config(kind))

    try:
        stock, ours, plan = _stock_and_ours(make)
    except RuntimeError as stock_error:  # some TRL releases cannot train this adapter at all (0.19: 4 virtual
        unsloth_patch.apply()            # tokens make its accuracy metric mismatch): then fail exactly as stock
        with pytest.raises(RuntimeError) as ours_error:
            make("ours").train()
        assert str(ours_error.value) == str(stock_error)
        assert "virtual tokens" in unsloth_patch.last_plan().padding_free_reason
        return
    assert not plan.padding_free and "virtual tokens" in plan.padding_free_reason
    _same_losses(stock, ours)


# -- MoE after the checkpointing probe ---------------------------------------------------------------

def test_moe_router_outputs_survive_the_probe(tokenizer, dataset, tmp_path, use_settings, monkeypatch):
    use_settings(memory_budget_gb=8.0)  # the probe runs on this CPU
    monkeypatch.setattr(wiring, "explicit_reason", lambda args: None)  # checkpointing is TRL's default here
    monkeypatch.setattr(wiring, "checkpointing_on", lambda args: True)

    def make(name):
        return sft_trainer(qwen3_moe(len(tokenizer)), tokenizer, dataset,
                           sft_config(tmp_path / name, max_length=48, max_steps=2))

    stock, ours, _ = _stock_and_ours(make)
    decision = getattr(ours, wiring._ATTRIBUTE)
    assert decision.probed and decision.peaks  # the probe really ran before training
    _same_losses(stock, ours)
    aux = [h["aux_loss"] for h in ours.state.log_history if "aux_loss" in h]
    if any("aux_loss" in h for h in stock.state.log_history):
        assert aux and all(a > 0 for a in aux)


# -- never slower than stock --------------------------------------------------------------------------

def test_auto_keeps_padded_batches_where_no_varlen_kernel_is_faster(tokenizer, dataset, tmp_path, use_settings):
    if torch.cuda.is_available():
        pytest.skip("on a GPU a varlen kernel runs")
    use_settings(padding_free="auto")
    trainer = sft_trainer(build_model("llama", vocab_size=len(tokenizer)), tokenizer, dataset,
                          sft_config(tmp_path, max_length=48, max_steps=1))
    plan = unsloth_patch.last_plan()
    assert not plan.padding_free and not isinstance(train_collator(trainer), PaddingFreeCollator)
    assert "no varlen attention kernel here (cpu" in plan.padding_free_reason
    assert "UNSLOTH_PATCH_PADDING_FREE=on" in plan.padding_free_reason


def test_explicit_padding_free_is_honoured_on_any_device(tokenizer, dataset, tmp_path, use_settings):
    from trl import SFTConfig

    from .helpers import config_fields

    if "padding_free" not in config_fields(SFTConfig):
        pytest.skip("this TRL has no padding_free")
    use_settings(padding_free="auto")
    trainer = sft_trainer(build_model("llama", vocab_size=len(tokenizer)), tokenizer, dataset,
                          sft_config(tmp_path, max_length=48, max_steps=1, padding_free=True))
    assert unsloth_patch.last_plan().padding_free and isinstance(train_collator(trainer), PaddingFreeCollator)
    if hasattr(trainer, "padding_free"):
        assert trainer.padding_free is True and trainer.args.padding_free is True  # consistent
