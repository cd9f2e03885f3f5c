"""The checkpointing probe's memory model: predicted peak (probe + optimizer state) against the peak of
the whole ``train()``, measured with the same live-tensor count, for every policy; small steps predict
a larger one; the probe stays under what it predicts and leaves nothing allocated.

(On a CPU, live tensor bytes stand in for ``torch.cuda.max_memory_allocated``: the same tensors,
without allocator rounding.)
"""

from __future__ import annotations

import contextlib
import importlib

import pytest

torch = pytest.importorskip("torch")

from unsloth_patch import checkpointing as policy  # noqa: E402
from unsloth_patch.attention import dispatch  # noqa: E402
from unsloth_patch.patches import checkpointing as wiring  # noqa: E402
from unsloth_patch.patches.training_edits import active  # noqa: E402
from unsloth_patch.tiny import build_model  # noqa: E402

from .helpers import config_fields, sft_config, sft_trainer, text_dataset, use_settings  # noqa: E402,F401

# Sequences of the probe-batch tests: long enough that every fixed-size chunk of the loss paths in the
# matrix is full already in a quarter of a batch of eight (TRL 0.20-1.0 computes its entropy metric in
# chunks of 128 logit rows, TRL 1.x its cross-entropy in chunks of 256 tokens), as with real sequences
# (hundreds of tokens and more). See test_short_sequences_err_on_the_safe_side for shorter ones.
LENGTH = 160


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=8)


def _trainer(tokenizer, dataset, tmp_path, flat=True, peft_config=None, **config):
    """Checkpointing on as TRL >= 0.24's default has it; padding-free (flat batches) unless ``flat`` is False."""
    from trl import SFTConfig

    values = dict(max_length=32, per_device_train_batch_size=4, max_steps=2)
    if "bf16" in config_fields(SFTConfig):
        values["bf16"] = False
    if flat and "padding_free" in config_fields(SFTConfig):
        values["padding_free"] = True
    values.update(config)
    model = build_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, seed=0)
    config = sft_config(tmp_path, **values)
    for name in wiring.FLAG_FIELDS:  # checkpointing on as TRL >= 0.24's default has it (not passed by the user)
        if hasattr(config, name):
            object.__setattr__(config, name, True)
    return sft_trainer(model, tokenizer, dataset, config, **({"peft_config": peft_config} if peft_config else {}))


def _whole_train_peak(trainer) -> int:
    tracker = policy._LiveBytes()
    for tensor in [*trainer.model.parameters(), *trainer.model.buffers()]:
        tracker.track(tensor)
    tracker.check()
    with tracker.measuring():
        trainer.train()
    tracker.check()
    return tracker.peak


def _only(chosen, monkeypatch):
    real_choose = policy.choose
    monkeypatch.setattr(policy, "choose", lambda candidates, *a, **k: real_choose([chosen], *a, **k))


@pytest.mark.parametrize("chosen, optim", [("none", "adamw_torch"), ("selective", "adamw_torch"),
                                           ("offload", "adamw_torch"), ("full", "adamw_torch"), ("none", "adafactor")])
def test_predicted_peak_is_within_five_percent_of_the_whole_runs_peak(chosen, optim, tokenizer, dataset, tmp_path,
                                                                      use_settings, monkeypatch):
    if chosen == "selective" and not policy.selective_available():
        pytest.skip("no selective activation checkpointing in this torch")
    # every batch as the worst one: the policy's own prediction (per-batch choices are the next test's)
    use_settings(memory_budget_gb=8.0, padding_free="on", checkpointing="uniform")
    _only(chosen, monkeypatch)
    trainer = _trainer(tokenizer, dataset, tmp_path, optim=optim)
    measured = _whole_train_peak(trainer)
    decision = policy.last_decision()
    assert decision.policy == chosen and decision.probed, decision.summary()
    predicted = decision.peaks[chosen] + decision.extra_bytes
    assert abs(predicted - measured) <= 0.05 * measured, (chosen, optim, predicted, measured)
    assert decision.probe_peak_bytes <= measured


@pytest.mark.parametrize("chosen, checkpointing", [("offload", "auto"), ("offload", "uniform"), ("full", "auto")])
def test_the_peak_predicted_for_the_batches_drawn_is_within_five_percent(chosen, checkpointing, tokenizer, tmp_path,
                                                                         use_settings, monkeypatch):
    """After ``train()`` the decision also holds the model's peak at the largest batch the run really drew (the
    probe sizes the worst batch the data could make), sized from the batches the training steps got and never
    above the worst-batch prediction. With TRL's fused LM head (TRL >= 1.15) it is within 5% of the whole run's
    peak. With the older TRL losses (full logits) it errs high, +19% on this tiny model (not yet explained),
    though still nearer than the worst-batch figure: that is asserted there, not more. With per-batch choices
    (``auto``) the batch drawn leaves room under the budget, and its last layers run without checkpointing: the
    prediction is then that choice's, and the run's peak rises with it."""
    use_settings(memory_budget_gb=8.0, padding_free="on", checkpointing=checkpointing)
    _only(chosen, monkeypatch)
    from datasets import Dataset

    # batches of 8 of these 12 lengths (three over max_length): the probe measures 1, 2 and 4 sequences of
    # max_length and extrapolates to the 8 longest together; the batch drawn is smaller than that, and larger
    # than the probe's own steps, so the training step holds the run's peak
    words = [400, 300, 200, 150, 150, 140, 130, 120, 110, 100, 90, 80]
    mixed = Dataset.from_dict({"text": [" ".join(["hello world"] * (n // 6)) for n in words]})
    trainer = _trainer(tokenizer, mixed, tmp_path, max_length=LENGTH, per_device_train_batch_size=8, max_steps=1)
    drawn = []
    step = trainer.training_step

    def noting(model, inputs, *args, **kwargs):
        drawn.append(int(inputs["input_ids"].numel()))
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = noting
    measured = _whole_train_peak(trainer)
    decision = policy.last_decision()
    assert decision.policy == chosen and decision.chosen_steps, decision.summary()
    assert decision.seen_sequences == max(drawn) / decision.longest
    worst = decision.peaks[chosen] + decision.extra_bytes
    predicted = decision.predicted_seen_bytes
    choosing = chosen == "offload" and checkpointing == "auto"
    if choosing:  # room left by the batch drawn: its last layers ran unchecked, within the budget less the margin
        assert decision.per_batch.seen["steps"] == 1 and decision.per_batch.seen["unchecked_layers"] != {"0": 1}
        assert predicted <= decision.per_batch.limit
    else:
        assert decision.per_batch is None and decision.per_batch_reason
        assert predicted <= worst
        assert worst > 1.1 * measured and decision.probe_peak_bytes < measured  # the case this test is about
    if hasattr(importlib.import_module("trl.trainer.utils"), "add_fused_lm_head"):
        assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
    else:
        assert 0.95 * measured <= predicted, (predicted, measured)
        assert choosing or predicted - measured < worst - measured, (predicted, measured, worst)


def test_the_probe_runs_under_the_mixed_precision_the_accelerator_trains_with(tokenizer, dataset, tmp_path,
                                                                              use_settings, monkeypatch):
    """transformers 4.x exports ACCELERATE_MIXED_PRECISION from any bf16 TrainingArguments to the process: a
    later bf16=False trainer then trains under bf16 autocast, and the probe must measure that, not its args."""
    use_settings(memory_budget_gb=8.0, padding_free="on")
    _only("none", monkeypatch)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    trainer = _trainer(tokenizer, dataset, tmp_path)
    expected = {"bf16": "bf16", "fp16": "fp16"}.get(str(trainer.accelerator.mixed_precision))
    assert wiring.mixed_precision(trainer) == expected
    measured = _whole_train_peak(trainer)
    decision = policy.last_decision()
    predicted = decision.peaks["none"] + decision.extra_bytes
    assert abs(predicted - measured) <= 0.05 * measured, (expected, predicted, measured)


def _probe_trainer(tokenizer, dataset, tmp_path, use_settings, flat):
    use_settings(padding_free="on" if flat else "off")
    return _trainer(tokenizer, dataset, tmp_path, flat=flat)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "padded"])
def test_two_small_steps_predict_the_full_batchs_peak(flat, tokenizer, dataset, tmp_path, use_settings):
    trainer = _probe_trainer(tokenizer, dataset, tmp_path, use_settings, flat)
    spec = policy.ProbeBatch([LENGTH] * 8, flat=flat)
    loss = wiring.trainer_loss(trainer)
    with active(trainer):  # the probe runs with the plan's model edits in place, as train() has them
        for name in policy.POLICIES:
            direct = policy.measure(trainer.model, spec, name, {}, None, None, loss_fn=loss)
            predicted = policy.predicted_peak(trainer.model, spec, name, {}, None, None, loss_fn=loss)
            assert abs(predicted - direct) <= 0.05 * direct, (name, predicted, direct)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "padded"])
def test_short_sequences_err_on_the_safe_side(flat, tokenizer, dataset, tmp_path, use_settings):
    """Not measurable, hence not held to 5%: with 32-token sequences, TRL 0.20-1.0's 128-row entropy chunks
    are still filling in the half-batch step (4 x 31 rows) and are full only in the full batch. No step of at
    most half the batch can see where a chunk stops growing, so the prediction extrapolates the chunk's
    growth and comes out high (by 10-25% on those versions), never low."""
    trainer = _probe_trainer(tokenizer, dataset, tmp_path, use_settings, flat)
    spec = policy.ProbeBatch([32] * 8, flat=flat)
    loss = wiring.trainer_loss(trainer)
    with active(trainer):
        for name in policy.POLICIES:
            direct = policy.measure(trainer.model, spec, name, {}, None, None, loss_fn=loss)
            predicted = policy.predicted_peak(trainer.model, spec, name, {}, None, None, loss_fn=loss)
            assert predicted >= 0.95 * direct, (name, predicted, direct)


def test_the_probe_stays_under_its_prediction_and_leaves_nothing_allocated(tokenizer, dataset, tmp_path,
                                                                           use_settings):
    import gc

    trainer = _probe_trainer(tokenizer, dataset, tmp_path, use_settings, flat=True)
    model = trainer.model
    spec = policy.ProbeBatch([LENGTH] * 8, flat=True)
    with active(trainer):
        gc.collect()
        tracker = policy._LiveBytes()
        for tensor in [*model.parameters(), *model.buffers()]:
            tracker.track(tensor)
        tracker.check()
        baseline = tracker.current
        with tracker.measuring():
            predicted = policy.predicted_peak(model, spec, "none", {}, None, None, loss_fn=wiring.trainer_loss(trainer))
        dispatch._state.__dict__.pop("positions", None)  # the varlen path's boundaries of its last batch
        gc.collect()
        tracker.sweep()
        assert tracker.current == baseline  # every tensor the probe made is gone
        assert tracker.peak < predicted  # two small steps, never the batch it predicts
        direct = policy.measure(model, spec, "none", {}, None, None, loss_fn=wiring.trainer_loss(trainer))
    assert abs(predicted - direct) <= 0.05 * direct  # and the prediction is the full step's peak
