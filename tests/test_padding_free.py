"""Padding-free batching: the user's unchanged SFTTrainer trains on flattened batches, with the
same tokens, the same per-sequence logits and the same loss as the padded run."""

from __future__ import annotations

import logging

import pytest
import torch
from packaging.version import Version

import unsloth_patch
from unsloth_patch import plan as planning
from unsloth_patch.collate import (LABEL_OFFSET_KEY, PaddingFreeCollator, boundaries_from_lengths, flatten_batch,
                                   lengths_from_position_ids)
from unsloth_patch.errors import UnslothPatchError
from unsloth_patch.settings import Settings
from unsloth_patch.tiny import available_families, build_model

from unsloth_patch.versions import at_least

from .helpers import (TRL, config_fields, during_training, losses, needs_trl, plugin_log, sft_config, sft_trainer,
                      text_dataset, train_collator, use_settings)  # noqa: F401  (fixture)

IGNORE = -100
INTERFACE = at_least("transformers", "4.51")  # AttentionInterface: unsloth_varlen
# Older transformers: the FlashAttention-2 classes host our kernels (attn_implementation reads so).
EXPECTED_ATTENTION = "unsloth_varlen" if INTERFACE else "flash_attention_2"
OLD_UNSUPPORTED = () if INTERFACE else ("gemma2",)  # its old FlashAttention-2 class drops soft-capping


@pytest.fixture(autouse=True)
def flatten_on_this_device(use_settings):
    """These tests are about the padding-free path itself: on a CPU, where ``auto`` keeps padded
    batches (no varlen kernel beats them there), ``on`` asks for it. Blocker tests set ``auto``."""
    use_settings(padding_free="on")


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=32)


def _model(tokenizer, family="llama", **overrides):
    return build_model(family, vocab_size=len(tokenizer), seed=0, **overrides)


def _first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    batch.pop(LABEL_OFFSET_KEY, None)
    return batch


def _boundaries(batch):
    """cu_seq_lens of a flat batch (models that take no boundary keywords get positions only)."""
    if "cu_seq_lens_q" in batch:
        return batch["cu_seq_lens_q"].tolist()
    return boundaries_from_lengths(lengths_from_position_ids(batch["position_ids"]))["cu_seq_lens_q"].tolist()


def _sequences(batch):
    """Per-sequence (input_ids, labels) of a padded or padding-free batch."""
    if "attention_mask" not in batch:
        cu = _boundaries(batch)
        return [(batch["input_ids"][0, a:b].tolist(), batch["labels"][0, a:b].tolist()) for a, b in zip(cu, cu[1:])]
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        keep = mask.bool()
        rows.append((ids[keep].tolist(), labels[keep].tolist()))
    return rows


@pytest.fixture
def stock():
    """Run the body with the plugin removed (stock TRL), then put it back."""
    class Stock:
        def __enter__(self):
            unsloth_patch.remove()

        def __exit__(self, *exc):
            unsloth_patch.apply()

    return Stock()


# -- the batches ----------------------------------------------------------------------------------

def test_unchanged_script_trains_on_flattened_batches(tokenizer, dataset, tmp_path, caplog):
    with plugin_log(caplog):
        trainer = sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=64))
    assert isinstance(train_collator(trainer), PaddingFreeCollator)
    assert not isinstance(trainer.data_collator, PaddingFreeCollator)  # evaluation keeps TRL's batches
    plan = unsloth_patch.last_plan()
    assert plan.padding_free and plan.attention in ("unsloth_varlen", planning.LEGACY)
    assert any("padding-free: on" in r.getMessage() for r in caplog.records)
    batch = _first_batch(trainer)
    assert "attention_mask" not in batch
    ids, positions, labels, cu = batch["input_ids"], batch["position_ids"], batch["labels"], batch["cu_seq_lens_q"]
    assert ids.shape[0] == 1 and positions.shape == ids.shape == labels.shape
    assert cu.dtype == torch.int32 and batch["cu_seq_lens_k"] is cu
    assert isinstance(batch["max_length_q"], int) and batch["max_length_q"] == int((cu[1:] - cu[:-1]).max())
    assert int(cu[-1]) == ids.shape[1] and len(cu) == 4 + 1  # batch size 4
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert positions[0, start:end].tolist() == list(range(end - start))
        assert labels[0, start] == IGNORE  # nothing predicted across a boundary
    original = trainer.model.config._attn_implementation
    with during_training(trainer):
        assert trainer.model.config._attn_implementation == EXPECTED_ATTENTION
    assert trainer.model.config._attn_implementation == original  # the edit lives only while training


def test_flattened_batch_holds_exactly_the_padded_tokens(tokenizer, dataset, tmp_path, stock):
    with stock:
        padded = _first_batch(sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=64)))
    flat = _first_batch(sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=64)))
    padded_rows, flat_rows = _sequences(padded), _sequences(flat)
    assert [ids for ids, _ in flat_rows] == [ids for ids, _ in padded_rows]
    for (_, flat_labels), (_, padded_labels) in zip(flat_rows, padded_rows):
        assert flat_labels[1:] == padded_labels[1:] and flat_labels[0] == IGNORE


@pytest.mark.parametrize("family", available_families())
def test_per_sequence_logits_equal_each_sequences_own_forward(family, tokenizer, dataset, tmp_path):
    overrides = {"sliding_window": 8} if family in ("mistral", "qwen2", "gemma2") else {}
    model = _model(tokenizer, family, **overrides)
    if family in OLD_UNSUPPORTED:  # UNSLOTH_PATCH_PADDING_FREE=on (this module's setting): a clear refusal
        with pytest.raises(UnslothPatchError, match="soft-capping"):
            sft_trainer(model, tokenizer, dataset, sft_config(tmp_path, max_length=48))
        return
    trainer = sft_trainer(model, tokenizer, dataset, sft_config(tmp_path, max_length=48))
    batch = _first_batch(trainer)
    model = trainer.model.eval()
    with torch.no_grad():
        with during_training(trainer):
            assert trainer.model.config._attn_implementation == EXPECTED_ATTENTION
            flat_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        elif INTERFACE:
            model.config._attn_implementation = "eager"
        # else: each sequence alone through the same (legacy) path is the plain causal forward
        cu = _boundaries(batch)
        for start, end in zip(cu, cu[1:]):
            own = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
            assert (flat_logits[start:end] - own).abs().max().item() <= 1e-5, (family, start, end)


# -- the loss -------------------------------------------------------------------------------------

def _trained_tokens(trainer, shifted_rows: bool):
    total = 0
    for batch in trainer.get_train_dataloader():
        labels = batch["labels"]
        total += int((labels[:, 1:] != IGNORE).sum()) if shifted_rows else int((labels != IGNORE).sum())
    return total


@pytest.mark.parametrize("accumulation", [pytest.param(1, marks=pytest.mark.smoke), 2])
def test_five_steps_give_the_padded_runs_losses_and_tokens(tokenizer, dataset, tmp_path, stock, accumulation):
    # A typical SFT learning rate: with 1e-3, Adam turns rounding-level gradient differences (different
    # summation order in padded vs flat batches) into lr-sized updates of near-zero-gradient weights.
    # fp32: TRL 1.7-1.12's default chunked loss takes log_softmax of bf16 logits under the bf16 autocast
    # TRL turns on by default (also on a CPU), which makes the comparison one of bf16 rounding
    config = dict(max_length=64, max_steps=5, gradient_accumulation_steps=accumulation, learning_rate=1e-4,
                  bf16=False)
    with stock:
        padded = sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path / "a", **config))
        padded.train()
        padded_tokens = _trained_tokens(padded, shifted_rows=True)
    flat = sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path / "b", **config))
    assert isinstance(train_collator(flat), PaddingFreeCollator)
    flat.train()
    expected, got = losses(padded), losses(flat)
    assert len(got) == len(expected) == 5
    for a, b in zip(expected, got):
        assert abs(a - b) <= 1e-4 * abs(a), (expected, got)
    assert _trained_tokens(flat, shifted_rows=False) == padded_tokens


def test_lora_model_trains_padding_free_with_the_padded_loss(tokenizer, dataset, tmp_path, stock):
    peft = pytest.importorskip("peft")

    def lora_model():
        return peft.get_peft_model(_model(tokenizer), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                      task_type="CAUSAL_LM"))

    with stock:
        padded = sft_trainer(lora_model(), tokenizer, dataset, sft_config(tmp_path / "a", max_length=64, max_steps=3))
        padded.train()
    flat = sft_trainer(lora_model(), tokenizer, dataset, sft_config(tmp_path / "b", max_length=64, max_steps=3))
    assert isinstance(train_collator(flat), PaddingFreeCollator)
    flat.train()
    for a, b in zip(losses(padded), losses(flat)):
        assert abs(a - b) <= 1e-4 * abs(a)


# -- truncation -----------------------------------------------------------------------------------

_MODES = ["keep_start", "keep_end"] if "truncation_mode" in config_fields(__import__("trl").SFTConfig) else [None]


@pytest.mark.parametrize("mode", _MODES)
def test_overlength_rows_truncated_exactly_like_the_padded_path(tokenizer, dataset, tmp_path, stock, mode):
    extra = {"truncation_mode": mode} if mode else {}
    with stock:
        padded = _first_batch(sft_trainer(_model(tokenizer), tokenizer, dataset,
                                          sft_config(tmp_path, max_length=24, **extra)))
    flat = _first_batch(sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=24, **extra)))
    padded_rows, flat_rows = _sequences(padded), _sequences(flat)
    assert max(len(ids) for ids, _ in padded_rows) == 24  # the limit is actually hit
    assert [ids for ids, _ in flat_rows] == [ids for ids, _ in padded_rows]


@needs_trl("1.0", "refusal of padding_free=True with max_length")
def test_explicit_padding_free_with_max_length_is_truncated_not_refused(tokenizer, dataset, tmp_path, stock):
    with stock:
        padded = _first_batch(sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=24)))
    config = sft_config(tmp_path, max_length=24, padding_free=True)
    trainer = sft_trainer(_model(tokenizer), tokenizer, dataset, config)
    assert trainer.args.padding_free is True  # the user's value is kept on the config
    flat = _first_batch(trainer)
    assert [ids for ids, _ in _sequences(flat)] == [ids for ids, _ in _sequences(padded)]


# -- masks of completion-only / assistant-only losses ---------------------------------------------

def _assert_same_labels(padded, flat):
    padded_rows, flat_rows = _sequences(padded), _sequences(flat)
    assert len(padded_rows) == len(flat_rows)
    masked = 0
    for (_, p), (_, f) in zip(padded_rows, flat_rows):
        assert f[1:] == p[1:]
        masked += sum(label == IGNORE for label in p[1:])
    assert masked > 0  # the prompt part really is masked


@needs_trl("0.20", "assistant_only_loss")
def test_assistant_only_loss_masks_survive_flattening(tokenizer, tmp_path, stock):
    from unsloth_patch.tiny import chat_dataset

    data = chat_dataset(tokenizer, limit=16, format="messages")
    config = dict(max_length=64, assistant_only_loss=True, dataset_text_field="text")
    with stock:
        padded = _first_batch(sft_trainer(_model(tokenizer), tokenizer, data, sft_config(tmp_path, **config)))
    flat = _first_batch(sft_trainer(_model(tokenizer), tokenizer, data, sft_config(tmp_path, **config)))
    _assert_same_labels(padded, flat)


@needs_trl("0.19", "completion_only_loss")
def test_completion_only_loss_masks_survive_flattening(tokenizer, tmp_path, stock):
    from unsloth_patch.tiny import chat_dataset

    from datasets import Dataset

    rows = chat_dataset(tokenizer, limit=16, format="prompt_completion")
    # standard (string) prompt/completion: the same masking without each TRL's chat-template quirks
    data = Dataset.from_list([
        {"prompt": tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
         "completion": r["completion"][0]["content"] + tokenizer.eos_token} for r in rows])
    with stock:
        padded = _first_batch(sft_trainer(_model(tokenizer), tokenizer, data, sft_config(tmp_path, max_length=64)))
    flat = _first_batch(sft_trainer(_model(tokenizer), tokenizer, data, sft_config(tmp_path, max_length=64)))
    _assert_same_labels(padded, flat)


@pytest.mark.skipif(TRL >= __import__("packaging.version").version.Version("0.20"),
                    reason="DataCollatorForCompletionOnlyLM was removed in TRL 0.20")
def test_completion_only_collator_masks_survive_flattening(tokenizer, dataset, tmp_path, stock):
    from trl import DataCollatorForCompletionOnlyLM

    def collator():
        return DataCollatorForCompletionOnlyLM(response_template="<|assistant|>", tokenizer=tokenizer)

    with stock:
        padded = _first_batch(sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=64),
                                          data_collator=collator()))
    trainer = sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=64),
                          data_collator=collator())
    assert isinstance(train_collator(trainer), PaddingFreeCollator)
    _assert_same_labels(padded, _first_batch(trainer))


# -- blockers -------------------------------------------------------------------------------------

def test_custom_collator_keeps_padded_batches_and_says_why(tokenizer, dataset, tmp_path, caplog, use_settings):
    from transformers import DataCollatorWithPadding

    use_settings(padding_free="auto")

    class MyCollator(DataCollatorWithPadding):
        def __call__(self, features):
            batch = super().__call__([{"input_ids": f["input_ids"]} for f in features])
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
            return batch

    with plugin_log(caplog):
        trainer = sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=64),
                              data_collator=MyCollator(tokenizer))
    assert not isinstance(train_collator(trainer), PaddingFreeCollator)
    plan = unsloth_patch.last_plan()
    assert not plan.padding_free and "custom data_collator (MyCollator)" in plan.padding_free_reason
    assert any("custom data_collator" in r.getMessage() for r in caplog.records)
    with during_training(trainer):
        assert trainer.model.config._attn_implementation != EXPECTED_ATTENTION


@needs_trl("0.16", "padding_free")
def test_explicit_padding_free_false_is_respected(tokenizer, dataset, tmp_path, use_settings):
    use_settings(padding_free="auto")
    trainer = sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=64,
                                                                             padding_free=False))
    assert not isinstance(train_collator(trainer), PaddingFreeCollator)
    assert "padding_free=False was passed explicitly" in unsloth_patch.last_plan().padding_free_reason


def test_forced_on_with_a_blocker_is_a_clear_error(tokenizer, dataset, tmp_path, monkeypatch):
    from transformers import DataCollatorWithPadding

    from unsloth_patch import settings as settings_module

    monkeypatch.setattr(settings_module, "_current", Settings(padding_free="on"))
    with pytest.raises(UnslothPatchError, match="UNSLOTH_PATCH_PADDING_FREE=on.*custom data_collator"):
        sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=64),
                    data_collator=DataCollatorWithPadding(tokenizer))


def test_off_never_touches_batching(tokenizer, dataset, tmp_path, monkeypatch):
    from unsloth_patch import settings as settings_module

    monkeypatch.setattr(settings_module, "_current", Settings(padding_free="off"))
    trainer = sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=64))
    assert not isinstance(train_collator(trainer), PaddingFreeCollator)
    with during_training(trainer):
        assert trainer.model.config._attn_implementation != EXPECTED_ATTENTION


@pytest.mark.parametrize("facts, reason", [
    (planning.TrainerFacts(vision="multimodal processing_class (LlavaProcessor)", attention_interface=True),
     "multimodal"),
    (planning.TrainerFacts(encoder_decoder=True, model_type="t5", attention_interface=True), "encoder-decoder"),
    (planning.TrainerFacts(model_type="mamba", attention_interface=True), "carries state"),
    (planning.TrainerFacts(model_type="qwen3_next", layer_types=("linear_attention", "full_attention"),
                           attention_interface=True), "carries state"),
    (planning.TrainerFacts(model_type="llama", layer_types=("full_attention", "linear_attention"),
                           attention_interface=True), "non-attention layers"),
    (planning.TrainerFacts(model_type="llama", attn_implementation="sdpa", attention_interface=False),
     "no AttentionInterface"),
])
def test_each_blocker_keeps_padded_batches_and_on_raises(facts, reason):
    plan = planning.decide(Settings(), facts)
    assert not plan.padding_free and reason in plan.padding_free_reason
    with pytest.raises(UnslothPatchError, match=reason):
        planning.decide(Settings(padding_free="on"), facts)


def test_flash_attention_choice_is_kept():
    plan = planning.decide(Settings(), planning.TrainerFacts(attn_implementation="flash_attention_2",
                                                             attention_interface=True))
    assert plan.padding_free and plan.attention is None and "flash_attention_2" in plan.attention_reason


def test_a_real_stateful_model_keeps_padded_batches(tokenizer, dataset, tmp_path, use_settings):
    use_settings(padding_free="auto")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "MambaConfig"):
        pytest.skip("no Mamba in this transformers")
    model = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, state_size=4))
    trainer = sft_trainer(model, tokenizer, dataset, sft_config(tmp_path, max_length=64))
    assert not isinstance(train_collator(trainer), PaddingFreeCollator)
    assert "carries state" in unsloth_patch.last_plan().padding_free_reason


# -- the flattening itself, on fresh random batches -------------------------------------------------

def test_flatten_random_padded_batches_left_and_right():
    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        rows, width = 5, 17
        lengths = torch.randint(1, width + 1, (rows,), generator=generator)
        ids = torch.randint(5, 100, (rows, width), generator=generator)
        labels = ids.clone()
        labels[torch.rand(rows, width, generator=generator) < 0.3] = IGNORE
        left = trial % 2 == 1
        mask = torch.zeros(rows, width, dtype=torch.long)
        for r, n in enumerate(lengths.tolist()):
            if left:
                mask[r, width - n:] = 1
            else:
                mask[r, :n] = 1
        labels = labels.masked_fill(mask == 0, IGNORE)
        out = flatten_batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, count_first_labels=True)
        cu = out["cu_seq_lens_q"].tolist()
        assert cu[-1] == int(lengths.sum()) == out["input_ids"].shape[1]
        expected_offset = 0
        for r, (a, b) in enumerate(zip(cu, cu[1:])):
            real = mask[r].bool()
            assert out["input_ids"][0, a:b].tolist() == ids[r][real].tolist()
            assert out["labels"][0, a + 1:b].tolist() == labels[r][real][1:].tolist()
            assert out["labels"][0, a] == IGNORE
            expected_offset += int(labels[r][real][0] != IGNORE)
            assert out["position_ids"][0, a:b].tolist() == list(range(b - a))
        assert int(out[LABEL_OFFSET_KEY]) == expected_offset


# -- TRL's own packing ------------------------------------------------------------------------------

@needs_trl("0.21", "bfd packing")
def test_bfd_packing_gets_boundaries_and_is_never_flattened_twice(tokenizer, dataset, tmp_path, stock):
    config = dict(max_length=64, packing=True, packing_strategy="bfd", max_steps=3, learning_rate=1e-4)
    with stock:
        packed = sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path / "a", **config))
        stock_batch = _first_batch(packed)
        packed.train()
    ours = sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path / "b", **config))
    plan = unsloth_patch.last_plan()
    assert plan.boundaries_only and not plan.padding_free and plan.attention == "unsloth_varlen"  # TRL >= 0.21
    batch = _first_batch(ours)
    assert batch["input_ids"].tolist() == stock_batch["input_ids"].tolist()  # TRL's rows, untouched
    lengths = (batch["cu_seq_lens_q"][1:] - batch["cu_seq_lens_q"][:-1]).tolist()
    assert sum(lengths) == batch["input_ids"].shape[1] and len(lengths) >= 4  # one per packed sequence
    starts = batch["cu_seq_lens_q"][:-1].tolist()
    assert [p for p, v in enumerate(batch["position_ids"][0].tolist()) if v == 0] == starts
    ours.train()
    if "position_ids" in stock_batch:  # stock packing is boundary-correct here: the same losses
        for a, b in zip(losses(packed), losses(ours)):
            assert abs(a - b) <= 1e-4 * abs(a)
    else:  # TRL 0.21-0.23 drop position_ids on sdpa, so the stock run attends across packed sequences
        assert TRL < Version("0.24") and len(losses(ours)) == len(losses(packed))


def test_boundaries_from_positions_stay_on_the_positions_device():
    """On a GPU the positions live on CUDA: nothing built from them may land on another device
    (a CPU tensor there broke generate() inside training on an H200)."""
    from unsloth_patch.collate import lengths_from_position_ids

    positions = torch.tensor([[3, 4, 0, 1, 2, 0, 1]])  # a row that starts mid-sequence
    with torch.device("meta"):  # tensors made without an explicit device would land here
        lengths = lengths_from_position_ids(positions)
    assert lengths.device == positions.device
    assert lengths.tolist() == [2, 3, 2]
