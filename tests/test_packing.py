"""Sample packing on request, on every TRL: whole examples in rows, none attending to another.

Where TRL packs with boundaries (0.19+) its packer runs and gets ``cu_seq_lens``; where it only
concatenates examples (before 0.19) ours packs them best-fit-decreasing. Either way every example
of the dataset is trained once per epoch, as its own sequence, with the labels of the unpacked run.
"""

from __future__ import annotations

import collections
import logging

import pytest
import torch

import unsloth_patch
from unsloth_patch import packing, plan as planning
from unsloth_patch.collate import LABEL_OFFSET_KEY, boundaries_from_lengths, lengths_from_position_ids
from unsloth_patch.patches.trainer_facts import base_model, boundary_packer
from unsloth_patch.tiny import build_model

from .helpers import (config_fields, during_training, losses, plugin_log, sft_config, sft_trainer, text_dataset,
                      use_settings)  # noqa: F401

IGNORE = -100
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=40)


def _model(tokenizer):
    return build_model("llama", vocab_size=len(tokenizer), seed=0)


def _trl_packer():
    from trl import SFTConfig

    return boundary_packer(SFTConfig)


def _trainer(tokenizer, dataset, tmp_path, model=None, data_collator=None, **config):
    values = dict(max_length=MAX_LENGTH, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-4)
    values.update(config)
    extra = {} if data_collator is None else {"data_collator": data_collator}
    return sft_trainer(model or _model(tokenizer), tokenizer, dataset, sft_config(tmp_path, **values), **extra)


def _unpacked_examples(tokenizer, dataset, tmp_path, **extra):
    """(input_ids, labels) of every example as the stock, unpacked run trains it."""
    unsloth_patch.remove()
    try:
        trainer = _trainer(tokenizer, dataset, tmp_path / "unpacked", packing=False, **extra)
        rows = []
        for batch in trainer.get_train_dataloader():
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
                keep = mask.bool()
                rows.append((tuple(ids[keep].tolist()), tuple(labels[keep].tolist())))
        return rows
    finally:
        unsloth_patch.apply()


def _segments(batch):
    if "cu_seq_lens_q" in batch:
        cu = batch["cu_seq_lens_q"].tolist()
    else:
        cu = boundaries_from_lengths(lengths_from_position_ids(batch["position_ids"]))["cu_seq_lens_q"].tolist()
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    return [(tuple(ids[a:b].tolist()), tuple(labels[a:b].tolist()), a, b) for a, b in zip(cu, cu[1:])]


def _epoch(trainer):
    batches = []
    for batch in trainer.get_train_dataloader():
        batch.pop(LABEL_OFFSET_KEY, None)
        batches.append(batch)
    return batches


def _completion_only(tokenizer):
    """A dataset (and collator, on TRL without prompt/completion support) whose prompts are masked."""
    from datasets import Dataset

    from unsloth_patch.tiny import chat_dataset

    from .helpers import TRL

    rows = chat_dataset(tokenizer, limit=40, format="prompt_completion")
    if TRL >= __import__("packaging.version").version.Version("0.19"):  # completion_only_loss
        data = Dataset.from_list([
            {"prompt": tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
             "completion": r["completion"][0]["content"] + tokenizer.eos_token} for r in rows])
        return data, {}
    from trl import DataCollatorForCompletionOnlyLM

    data = Dataset.from_list([{"text": tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)}
                              for r in rows])
    return data, {"data_collator": DataCollatorForCompletionOnlyLM(response_template="<|assistant|>",
                                                                   tokenizer=tokenizer)}


@pytest.mark.parametrize("kind", ["language-modeling", "completion-only"])
def test_every_example_is_trained_once_per_epoch_as_its_own_sequence(kind, tokenizer, dataset, tmp_path):
    extra = {}
    if kind == "completion-only":
        dataset, extra = _completion_only(tokenizer)
        extra["max_length"] = 2 * MAX_LENGTH  # room for prompts and their completions
    trainer = _trainer(tokenizer, dataset, tmp_path / "packed", packing=True, **extra)
    plan = unsloth_patch.last_plan()
    assert plan.packer == ("TRL" if _trl_packer() else planning.OUR_PACKER)
    assert 0 < plan.packing_efficiency <= 1
    unpacked = [(ids, labels) for ids, labels in _unpacked_examples(tokenizer, dataset, tmp_path, **extra)
                if any(label != IGNORE for label in labels[1:])]  # examples with something to train
    expected = collections.Counter(ids for ids, _ in unpacked)
    labels_of = dict(unpacked)
    if kind == "completion-only":
        assert sum(label == IGNORE for _, labels in unpacked for label in labels[1:]) > 0  # prompts masked
    seen = collections.Counter()
    for batch in _epoch(trainer):
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        for ids, labels, start, end in _segments(batch):
            assert batch["position_ids"][0, start:end].tolist() == list(range(end - start))
            assert labels[0] == IGNORE
            if all(label == IGNORE for label in labels):
                continue  # nothing to train (a prompt truncated before its completion, say)
            assert labels[1:] == labels_of[ids][1:]  # the unpacked run's labels
            seen[ids] += 1
    assert seen == expected  # every token of the dataset (after truncation), exactly once
    assert sum(len(ids) * n for ids, n in seen.items()) == sum(len(ids) * n for ids, n in expected.items())


def _lora(tokenizer):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(_model(tokenizer), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  task_type="CAUSAL_LM"))


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_each_example_in_a_packed_row_gives_its_own_logits_and_loss(adapter, tokenizer, dataset, tmp_path):
    model = _lora(tokenizer) if adapter else None
    trainer = _trainer(tokenizer, dataset, tmp_path, model=model, packing=True)
    batch = _epoch(trainer)[0]
    segments = _segments(batch)
    assert len(segments) >= 3  # really packed: several examples in the step's rows
    model = trainer.model.eval()
    # Logits come from a forward without labels, the loss from one with them: TRL 1.7-1.14 default to
    # loss_type="chunked_nll", whose forward (stock) returns the loss but no logits when given labels.
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        with during_training(trainer):
            # a cache would turn off transformers' packed-sequence isolation (kept on by transformers 4.x)
            assert not base_model(model).config.use_cache
            flat_logits = model(**inputs).logits[0]
            out = model(**batch)
        counted = int((batch["labels"][0, 1:] != IGNORE).sum())
        packed_sum = float(out.loss) * counted
        own_sum = 0.0
        for ids, labels, start, end in segments:
            own_logits = model(input_ids=torch.tensor([ids])).logits[0]
            assert (flat_logits[start:end] - own_logits).abs().max().item() <= 1e-5
            n = sum(label != IGNORE for label in labels[1:])
            own = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            own_sum += float(own.loss) * n if n else 0.0
    assert abs(packed_sum - own_sum) <= 1e-5 * abs(own_sum)


def test_packing_on_toggle_packs_a_config_that_says_no(tokenizer, dataset, tmp_path, use_settings):
    use_settings(packing="on")
    trainer = _trainer(tokenizer, dataset, tmp_path, packing=False)
    assert unsloth_patch.last_plan().packer is not None and trainer.args.packing is True
    assert len(_epoch(trainer)) < len(dataset) / 2  # fewer steps than unpacked batches of 2


def test_packing_off_by_default_changes_no_step_count(tokenizer, dataset, tmp_path, use_settings):
    use_settings(padding_free="on")
    trainer = _trainer(tokenizer, dataset, tmp_path, packing=False)
    assert unsloth_patch.last_plan().packer is None
    assert len(_epoch(trainer)) == len(dataset) // 2  # one step per batch of two examples, as stock


def test_gradient_accumulation_trains_the_same_tokens_per_optimizer_step(tokenizer, dataset, tmp_path):
    one = _trainer(tokenizer, dataset, tmp_path / "a", packing=True, per_device_train_batch_size=4,
                   gradient_accumulation_steps=1, max_steps=2)
    one.train()
    two = _trainer(tokenizer, dataset, tmp_path / "b", packing=True, per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, max_steps=2)
    two.train()
    for a, b in zip(losses(one), losses(two)):
        assert abs(a - b) <= 1e-4 * abs(a), (losses(one), losses(two))


@pytest.mark.skipif(not _trl_packer(), reason="this TRL has no packing_strategy to choose 'wrapped' with")
def test_an_explicit_wrapped_strategy_is_respected_with_a_warning(tokenizer, dataset, tmp_path, caplog):
    with plugin_log(caplog, logging.INFO):
        trainer = _trainer(tokenizer, dataset, tmp_path, packing=True, packing_strategy="wrapped")
    plan = unsloth_patch.last_plan()
    assert plan.packer is None and "wrapped" in plan.padding_free_reason and "attend" in plan.padding_free_reason
    assert trainer.args.packing_strategy == "wrapped"


def test_best_fit_decreasing_fills_rows_deterministically():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 65, (300,), generator=generator).tolist()
    rows = packing.best_fit_decreasing(lengths, 64)
    assert rows == packing.best_fit_decreasing(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    lower_bound = -(-sum(lengths) // 64)
    assert len(rows) <= lower_bound * 1.1 + 1  # near-full rows
    assert packing.best_fit_decreasing([5, 0, 3], 8) == [[0, 2]]  # an empty example has nothing to train
    with pytest.raises(ValueError, match="more than the row length"):
        packing.best_fit_decreasing([9], 8)


def test_best_fit_picks_the_fullest_row_that_fits():
    # rows after the first three: [6] (2 free), [5] (3 free), [4] (4 free); a 2 goes to the 6-row
    assert packing.best_fit_decreasing([6, 5, 4, 2], 8) == [[0, 3], [1], [2]]


def _eval_segments(trainer, batch):
    """(token ids, row, start, end) of each example in an evaluation batch."""
    if unsloth_patch.last_plan().packer == "TRL":
        assert batch["input_ids"].shape[0] == 1 and ("position_ids" in batch or "cu_seq_lens_q" in batch)
        segments = [(ids, 0, start, end) for ids, _, start, end in _segments(batch)]
        assert len(segments) >= 2  # packed
        return segments
    examples = {tuple(ids) for ids in trainer.eval_dataset["input_ids"]}
    segments = []
    for row, mask in enumerate(batch["attention_mask"].bool()):
        ids = tuple(batch["input_ids"][row][mask].tolist())
        assert ids in examples  # one whole example of the eval dataset, not a cut of a stream
        positions = mask.nonzero().flatten()
        segments.append((ids, row, int(positions[0]), int(positions[-1]) + 1))
    return segments


def test_eval_of_a_packed_run_keeps_every_example_to_itself(tokenizer, dataset, tmp_path):
    """``eval_packing`` (on with ``packing``): evaluation and prediction never attend across examples,
    during and after ``train()``. Where TRL packs the eval rows, every example's logits in them equal its
    own forward — also on the stacks where a stock evaluation lets them attend to each other (TRL
    0.20-0.23 drop the rows' positions, transformers 4.x's SDPA ignores them); where our packer packs the
    training rows (TRL before 0.20), evaluation gets one whole example per padded row."""
    from trl import SFTConfig

    fields = config_fields(SFTConfig)
    strategy = "eval_strategy" if "eval_strategy" in fields else "evaluation_strategy"
    # TRL releases whose default loss is the chunked LM head return no logits from predict(), stock or not
    logits = {"loss_type": "nll"} if "loss_type" in fields else {}
    config = sft_config(tmp_path, max_length=MAX_LENGTH, max_steps=2, per_device_train_batch_size=2,
                        per_device_eval_batch_size=2, packing=True, eval_steps=1, bf16=False,  # fp32 logits
                        **{strategy: "steps"}, **logits)
    trainer = sft_trainer(_model(tokenizer), tokenizer, dataset, config, eval_dataset=dataset.select(range(12)))
    trainer.train()
    evaluated = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evaluated) == 2 and all(torch.isfinite(torch.tensor(evaluated)))  # inside train(), at each step
    batches = [{k: v for k, v in b.items() if k != LABEL_OFFSET_KEY} for b in trainer.get_eval_dataloader()]
    predicted = trainer.predict(trainer.eval_dataset).predictions  # after train(): the model as given again
    predicted = torch.as_tensor(predicted[0] if isinstance(predicted, tuple) else predicted)
    model = trainer.model.eval()
    rows_per_batch = predicted.shape[0] // len(batches)
    checked = 0
    with torch.no_grad():
        for index, batch in enumerate(batches):
            logits = predicted[index * rows_per_batch:(index + 1) * rows_per_batch]
            for ids, row, start, end in _eval_segments(trainer, batch):
                own = model(input_ids=torch.tensor([ids])).logits[0]
                assert (logits[row, start:end].float() - own).abs().max().item() <= 1e-5
                checked += 1
    assert checked == len(trainer.eval_dataset["input_ids"]) if unsloth_patch.last_plan().packer != "TRL" \
        else checked == sum(len(n) for n in trainer.eval_dataset["seq_lengths"])
