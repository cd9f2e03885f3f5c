"""The checkpointing probe's memory model: predicted peak (probe + optimizer state) against the peak of
the whole ``train()``, measured with the same live-tensor count, for every policy; the probe itself
stays under what it predicts and leaves nothing allocated.

(On a CPU, live tensor bytes stand in for ``torch.cuda.max_memory_allocated``: the same tensors,
without allocator rounding.)
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from unsloth_patch import checkpointing as policy  # noqa: E402
from unsloth_patch.patches import checkpointing as wiring  # noqa: E402
from unsloth_patch.tiny import build_model  # noqa: E402

from .helpers import config_fields, sft_config, sft_trainer, text_dataset, use_settings  # noqa: E402,F401


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=8)


def _trainer(tokenizer, dataset, tmp_path, **config):
    from trl import SFTConfig

    values = dict(max_length=32, per_device_train_batch_size=4, max_steps=2)
    if "bf16" in config_fields(SFTConfig):
        values["bf16"] = False
    values.update(config)
    model = build_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, seed=0)
    config = sft_config(tmp_path, **values)
    for name in wiring.FLAG_FIELDS:  # checkpointing on as TRL >= 0.24's default has it (not passed by the user)
        if hasattr(config, name):
            object.__setattr__(config, name, True)
    return sft_trainer(model, tokenizer, dataset, config)


def _whole_train_peak(trainer) -> int:
    tracker = policy._LiveBytes()
    for tensor in [*trainer.model.parameters(), *trainer.model.buffers()]:
        tracker.track(tensor)
    tracker.check()
    with tracker.measuring():
        trainer.train()
    tracker.check()
    return tracker.peak


@pytest.mark.parametrize("chosen, optim", [("none", "adamw_torch"), ("selective", "adamw_torch"),
                                           ("offload", "adamw_torch"), ("full", "adamw_torch"), ("none", "adafactor")])
def test_predicted_peak_is_within_five_percent_of_the_whole_runs_peak(chosen, optim, tokenizer, dataset, tmp_path,
                                                                      use_settings, monkeypatch):
    if chosen == "selective" and not policy.selective_available():
        pytest.skip("no selective activation checkpointing in this torch")
    use_settings(memory_budget_gb=8.0)
    real_choose = policy.choose

    def choose_this(candidates, measure, budget, extra=0):
        _, peaks = real_choose([c for c in candidates if c == chosen], measure, budget, extra)
        return chosen, peaks

    monkeypatch.setattr(policy, "choose", choose_this)
    trainer = _trainer(tokenizer, dataset, tmp_path, optim=optim, padding_free=True) \
        if "padding_free" in config_fields(__import__("trl").SFTConfig) else \
        _trainer(tokenizer, dataset, tmp_path, optim=optim)
    measured = _whole_train_peak(trainer)
    decision = policy.last_decision()
    assert decision.policy == chosen and decision.probed
    predicted = decision.peaks[chosen] + decision.extra_bytes
    assert abs(predicted - measured) <= 0.05 * measured, (chosen, optim, predicted, measured)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "padded"])
def test_two_small_steps_predict_the_full_batchs_peak(flat, tokenizer, dataset, tmp_path):
    trainer = _trainer(tokenizer, dataset, tmp_path)
    spec = policy.ProbeBatch([32] * 8, flat=flat)
    for name in policy.POLICIES:
        loss = wiring.trainer_loss(trainer)
        direct = policy.measure(trainer.model, spec, name, {}, None, None, loss_fn=loss)
        predicted = policy.predicted_peak(trainer.model, spec, name, {}, None, None, loss_fn=loss)
        assert abs(predicted - direct) <= 0.05 * direct, (name, predicted, direct)


def test_the_probe_stays_under_its_prediction_and_leaves_nothing_allocated(tokenizer, dataset, tmp_path):
    import gc

    trainer = _trainer(tokenizer, dataset, tmp_path)
    model = trainer.model
    spec = policy.ProbeBatch([32] * 8, flat=True)
    gc.collect()
    tracker = policy._LiveBytes()
    for tensor in [*model.parameters(), *model.buffers()]:
        tracker.track(tensor)
    tracker.check()
    baseline = tracker.current
    with tracker.measuring():
        predicted = policy.predicted_peak(model, spec, "none", {}, None, None, loss_fn=wiring.trainer_loss(trainer))
    gc.collect()
    tracker.sweep()
    assert tracker.current == baseline  # every tensor the probe made is gone
    assert tracker.peak < predicted  # two small steps, never the batch it predicts
    direct = policy.measure(model, spec, "none", {}, None, None, loss_fn=wiring.trainer_loss(trainer))
    assert abs(predicted - direct) <= 0.05 * direct  # and the prediction is the full step's peak
