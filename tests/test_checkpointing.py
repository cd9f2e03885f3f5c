"""Activation checkpointing policy: probe, budget, branches, explicit settings, exact losses.

Runs on CPU with every TRL / transformers pair of the matrix. The budget comes from
UNSLOTH_PATCH_MEMORY_BUDGET_GB (set through the settings object here); each budget is derived
from peaks probed in the test itself, so the tests do not depend on exact byte counts.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import unsloth_patch  # noqa: E402  (activates the patches before TRL/transformers load)
from unsloth_patch import checkpointing as policy  # noqa: E402
from unsloth_patch.checkpointing import probe as probe_module  # noqa: E402
from unsloth_patch.patches import checkpointing as wiring  # noqa: E402
from unsloth_patch.patches.config_fields import explicit_fields  # noqa: E402
from unsloth_patch.tiny import build_model  # noqa: E402

from .helpers import config_fields, losses, plugin_log, sft_config, sft_trainer, text_dataset  # noqa: E402

unsloth_patch.apply()
settings_module = sys.modules["unsloth_patch.settings"]
GIB = policy.GIB


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=16)


@pytest.fixture
def use_settings(monkeypatch):
    def set_(**values):
        monkeypatch.setattr(settings_module, "_current", dataclasses.replace(settings_module.current(), **values))

    return set_


def _config(tmp_path, default_on=True, **overrides):
    """A config whose gradient checkpointing is on only by default (``was_explicit`` False)."""
    from trl import SFTConfig

    values = dict(max_length=32, per_device_train_batch_size=2, max_steps=2)
    if "bf16" in config_fields(SFTConfig):
        values["bf16"] = False
    values.update(overrides)
    config = sft_config(tmp_path, **values)
    if default_on and "gradient_checkpointing" not in overrides:
        # TRL >= 0.24 defaults to True; older TRL defaults to False, so set it as that default would
        for name in wiring.FLAG_FIELDS:
            if hasattr(config, name):
                object.__setattr__(config, name, True)
        assert not any(n in (explicit_fields(config) or ()) for n in wiring.FLAG_FIELDS)
    return config


def _trainer(tokenizer, dataset, config, **kwargs):
    model = build_model("llama", vocab_size=len(tokenizer), seed=0)
    return sft_trainer(model, tokenizer, dataset, config, **kwargs)


def _layers_checkpointing(trainer):
    return {type(m._gradient_checkpointing_func).__name__ if hasattr(m, "_gradient_checkpointing_func") else None
            for m in trainer.model.modules() if getattr(m, "gradient_checkpointing", False)}


@pytest.fixture(scope="module")
def probed(tokenizer, dataset, tmp_path_factory):
    """Peak of each candidate and the later extra, measured once on the test trainer's shape."""
    trainer = _trainer(tokenizer, dataset, _config(tmp_path_factory.mktemp("probe")))
    spec = wiring.probe_spec(trainer)
    peaks = {name: policy.predicted_peak(trainer.model, spec, name, {}, None, None,
                                         loss_fn=wiring.trainer_loss(trainer)) for name in policy.POLICIES}
    return peaks, wiring.extra_bytes(trainer)


# Live-byte peaks can differ by a few bytes between probes on some transformers versions (small
# scalars); budgets get a little slack and peaks are compared to the same tolerance.
SLACK = 4096


def _budget(nbytes):
    return (nbytes + SLACK) / GIB


def _close(a, b):
    return a is not None and b is not None and abs(a - b) <= SLACK


# --------------------------------------------------------------------------- pure policy


def test_choose_keeps_the_fastest_that_fits_and_skips_slower_ones():
    seen = []

    def measure(name):
        seen.append(name)
        return {"none": 100, "selective": 70, "mlp_recompute": 45, "offload": 40, "full": 50}[name]

    assert policy.choose(policy.POLICIES, measure, budget=80, extra=5) == ("selective", {"none": 100, "selective": 70})
    assert seen == ["none", "selective"]
    assert policy.choose(policy.POLICIES, measure, budget=10)[0] is None


def test_choose_falls_through_an_out_of_memory_candidate():
    def measure(name):
        if name == "none":
            raise torch.cuda.OutOfMemoryError("simulated")
        return 10

    assert policy.choose(policy.POLICIES, measure, budget=100) == ("selective", {"none": None, "selective": 10})


def test_the_memory_model_extrapolates_each_phase():
    """A backward phase dominating small steps, a forward phase growing faster: the full batch's peak is the
    forward phase's, which two whole-step peaks would miss."""
    def step(n):  # baseline 100; forward: 50 fixed + 200 a sequence; backward: gradients (500) + 400 + 10 a sequence
        return policy.Step(n, 100, ((150 + 200 * n, 0), (1000 + 10 * n, 500)))

    assert [step(n).peak for n in (2, 4, 8)] == [1020, 1040, 1750]
    assert policy.extrapolate(step(2), step(4), 8) == 1750
    different = policy.Step(4, 100, ((1040, 0),))  # phases that do not line up: the whole steps' peaks
    assert policy.extrapolate(step(2), different, 8) == 1080


def test_the_peak_at_any_batch_size_comes_from_the_measured_steps():
    """What a run's largest batch should hold (``peak_at``): measured sizes as measured, the straight line between
    two steps phase by phase, the extrapolation above them, and no less than the smallest step below it."""
    def step(n):  # as above: a forward phase growing 200 a sequence, a backward phase 10
        return policy.Step(n, 100, ((150 + 200 * n, 0), (1000 + 10 * n, 500)))

    steps = [step(1), step(2), step(4)]
    assert policy.peak_at(steps, 2) == step(2).peak and policy.peak_at(steps, 4) == step(4).peak
    assert policy.peak_at(steps, 3) == 1030  # between 2 and 4: max(150 + 600, 1000 + 30), not a whole-peak line
    assert policy.peak_at(steps, 8) == policy.extrapolate(step(2), step(4), 8) == 1750
    assert policy.peak_at(steps, 5.5) == int(max(150 + 200 * 5.5, 1000 + 10 * 5.5))
    assert policy.peak_at(steps[1:], 0.5) == step(2).peak  # below the smallest step measured: that step's peak
    assert policy.peak_at([step(2)], 4) == policy.estimate.from_one(step(2), 4)
    assert policy.peak_at([], 4) is None


def test_ranks_agree_on_the_most_conservative_policy():
    index = policy.POLICIES.index
    assert policy.POLICIES[policy.agree([index("none"), index("offload"), index("selective")])] == "offload"
    assert policy.agree([0, 0]) == 0
    assert policy.agree_across_ranks(1) == 1  # no process group: this rank's own choice


def test_budget_rules():
    assert policy.budget_for(80 * GIB, None) == 72 * GIB
    assert policy.budget_for(80 * GIB, None, available_bytes=40 * GIB) == 32 * GIB
    assert policy.budget_for(80 * GIB, 10.0) == 10 * GIB
    assert policy.budget_for(None, None) is None


@pytest.mark.parametrize("optim, optim_args", [("adamw_torch", ""), ("adamw_torch_fused", ""), ("sgd", ""),
                                               ("sgd", "momentum=0.9"), ("adafactor", ""), ("rmsprop", ""),
                                               ("adagrad", "")])
def test_optimizer_state_model_is_exact_for_the_optimizers_transformers_builds(optim, optim_args, tmp_path):
    """The memory model's 'later extra' against the state a real optimizer holds after a step."""
    from transformers import Trainer, TrainingArguments

    model = build_model("llama", vocab_size=300, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, optim_args=optim_args or None, report_to="none",
                             use_cpu=True)
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    except TypeError:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    optimizer = cls(model.parameters(), **kwargs)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    held = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))
    predicted = policy.optimizer_state_bytes([(tuple(p.shape), p.element_size()) for p in model.parameters()],
                                             optim, kwargs)
    assert abs(predicted - held) <= 0.001 * max(held, 1) + 64, (optim, predicted, held)


def test_probed_peaks_rank_like_device_memory(probed):
    peaks, _ = probed
    # offload saves the layer inputs that are stored at the peak; in this tiny model the peak is
    # the recomputation of the bottom layer, whose input is back on the device either way
    assert peaks["none"] > peaks["selective"] > peaks["full"] and peaks["full"] + SLACK >= peaks["offload"] > 0


def test_offload_moves_saved_layer_inputs_off_the_device():
    layer = torch.nn.Linear(128, 128)
    x = torch.randn(64, 128, requires_grad=True)

    def live_after_forward(name):
        tracker = policy._LiveBytes()
        with tracker.measuring():
            h = x * 2  # a layer input: afterwards only the checkpoint refers to it
            out = policy.checkpoint_function(name)(lambda t: layer(t).relu(), h)
            del h
            tracker.sweep()
            live = tracker.current
        out.sum().backward()
        return live

    assert live_after_forward("full") - live_after_forward("offload") == 64 * 128 * 4


def test_probe_restores_model_grads_and_rng(tokenizer, dataset, tmp_path):
    import random

    import numpy

    trainer = _trainer(tokenizer, dataset, _config(tmp_path))
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(m, m.__dict__.get("gradient_checkpointing")) for m in model.modules()]
    model.eval()
    states = torch.get_rng_state(), random.getstate(), numpy.random.get_state()[1].copy()
    policy.measure(model, wiring.probe_spec(trainer), "selective", {}, None, None)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [(m, m.__dict__.get("gradient_checkpointing")) for m in model.modules()] == flags
    assert not model.training
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (numpy.random.get_state()[1] == states[2]).all()


# --------------------------------------------------------------------------- branches through Trainer.train


@pytest.mark.parametrize("expected", ["none", "selective", "offload"])
def test_each_branch_under_a_matching_budget(expected, probed, tokenizer, dataset, tmp_path, use_settings, caplog):
    peaks, extra = probed
    use_settings(memory_budget_gb=_budget(peaks[expected] + extra))
    trainer = _trainer(tokenizer, dataset, _config(tmp_path, max_steps=1))
    with plugin_log(caplog):
        trainer.train()
    decision = policy.last_decision()
    assert decision.policy == expected, decision.summary()
    assert decision.probed
    # the tiny CPU model has no fused MLPs, so mlp_recompute is not offered, and says why
    offered = [name for name in policy.POLICIES if name != "mlp_recompute"]
    assert list(decision.peaks) == offered[: offered.index(expected) + 1]
    assert decision.rejected["mlp_recompute"].startswith("not available: no fused gated MLP")
    assert _close(decision.peaks[expected], peaks[expected]), (decision.peaks, peaks)
    # a faster candidate that cannot fit ran out of (simulated) memory in its small probe, or was measured over
    assert all(decision.peaks[k] is None or _close(decision.peaks[k], peaks[k]) for k in decision.peaks)
    assert any("checkpointing: " + expected in r.getMessage() for r in caplog.records)
    assert wiring.checkpointing_on(trainer.args)  # the user's arguments are back after train()
    layers = _layers_checkpointing(trainer)
    if expected == "none":
        assert layers == set()
    else:
        assert layers == {"function"}


def test_full_when_nothing_else_fits(probed, tokenizer, dataset, tmp_path, use_settings, monkeypatch):
    peaks, extra = probed
    use_settings(memory_budget_gb=_budget(peaks["full"] + extra))
    real = probe_module.run_probe

    def offload_runs_out(model, batch, name, kwargs, mixed, loss_fn=None):
        if name == "offload":
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(model, batch, name, kwargs, mixed, loss_fn)

    monkeypatch.setattr(probe_module, "run_probe", offload_runs_out)
    trainer = _trainer(tokenizer, dataset, _config(tmp_path, max_steps=1))
    trainer.train()
    decision = policy.last_decision()
    assert decision.policy == "full" and decision.peaks["offload"] is None
    assert _close(decision.peaks["full"], peaks["full"])
    assert _layers_checkpointing(trainer) == {"partial"}  # transformers' own checkpoint, as TRL set it


def test_budget_below_every_candidate_keeps_full(probed, tokenizer, dataset, tmp_path, use_settings):
    peaks, extra = probed
    use_settings(memory_budget_gb=_budget(peaks["offload"] // 2))
    trainer = _trainer(tokenizer, dataset, _config(tmp_path, max_steps=1))
    trainer.train()
    decision = policy.last_decision()
    assert decision.policy == "full" and "no candidate fits" in decision.reason
    assert all(v is None for v in decision.peaks.values())  # each ran into the simulated limit


def test_probe_out_of_memory_falls_through(tokenizer, dataset, tmp_path, use_settings, monkeypatch):
    use_settings(memory_budget_gb=64.0)
    real = probe_module.run_probe

    def none_runs_out(model, batch, name, kwargs, mixed, loss_fn=None):
        if name == "none":
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(model, batch, name, kwargs, mixed, loss_fn)

    monkeypatch.setattr(probe_module, "run_probe", none_runs_out)
    trainer = _trainer(tokenizer, dataset, _config(tmp_path, max_steps=1))
    trainer.train()
    decision = policy.last_decision()
    assert decision.policy == "selective"
    assert decision.peaks["none"] is None and decision.peaks["selective"] > 0
    assert all(p.grad is None or p.grad.abs().sum() >= 0 for p in trainer.model.parameters())


def _no_probe(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the probe must not run")

    monkeypatch.setattr(policy, "measure", fail)


@pytest.mark.parametrize("value", [True, False])
def test_explicit_setting_is_untouched(value, tokenizer, dataset, tmp_path, use_settings, monkeypatch):
    use_settings(memory_budget_gb=64.0)
    _no_probe(monkeypatch)
    trainer = _trainer(tokenizer, dataset, _config(tmp_path, max_steps=1, gradient_checkpointing=value))
    trainer.train()
    decision = policy.last_decision()
    assert not decision.probed and "explicitly" in decision.reason
    assert decision.policy == ("full" if value else "none")
    assert bool(_layers_checkpointing(trainer)) is value
    assert trainer.args.gradient_checkpointing is value


def test_toggle_off_and_missing_budget_leave_trl_default(tokenizer, dataset, tmp_path, use_settings, monkeypatch):
    _no_probe(monkeypatch)
    use_settings(checkpointing="off", memory_budget_gb=64.0)
    trainer = _trainer(tokenizer, dataset, _config(tmp_path, max_steps=1))
    trainer.train()
    assert policy.last_decision().policy == "full" and "=off" in policy.last_decision().reason
    assert _layers_checkpointing(trainer) == {"partial"}
    use_settings(checkpointing="auto", memory_budget_gb=None)  # CPU without a budget: nothing to measure
    trainer = _trainer(tokenizer, dataset, _config(tmp_path, max_steps=1))
    trainer.train()
    assert policy.last_decision().policy == "full" and "no GPU" in policy.last_decision().reason


def test_unknown_explicitness_counts_as_explicit(tokenizer, dataset, tmp_path, use_settings, monkeypatch):
    use_settings(memory_budget_gb=64.0)
    _no_probe(monkeypatch)
    config = _config(tmp_path, max_steps=1)
    object.__delattr__(config, "_unsloth_patch_explicit_fields")
    trainer = _trainer(tokenizer, dataset, config)
    trainer.train()
    assert "cannot tell" in policy.last_decision().reason


# --------------------------------------------------------------------------- exact losses


def _five_steps(tokenizer, dataset, tmp_path, **overrides):
    trainer = _trainer(tokenizer, dataset, _config(tmp_path, max_steps=5, **overrides))
    trainer.train()
    return losses(trainer), policy.last_decision()


def test_losses_identical_to_the_run_without_probe(probed, tokenizer, dataset, tmp_path, use_settings, monkeypatch):
    peaks, extra = probed
    # none: the probed run against the same run with checkpointing turned off by the user
    use_settings(memory_budget_gb=_budget(peaks["none"] + extra))
    probed_none, decision = _five_steps(tokenizer, dataset, tmp_path)
    assert decision.policy == "none"
    plain, _ = _five_steps(tokenizer, dataset, tmp_path, gradient_checkpointing=False)
    assert len(plain) == 5 and probed_none == plain
    # selective: the probed run against the same policy installed without any probe
    use_settings(memory_budget_gb=_budget(peaks["selective"] + extra))
    probed_selective, decision = _five_steps(tokenizer, dataset, tmp_path)
    assert decision.policy == "selective"
    monkeypatch.setattr(wiring, "decide", lambda trainer, settings: policy.Decision("selective", "forced", True))
    forced, _ = _five_steps(tokenizer, dataset, tmp_path)
    assert len(forced) == 5 and probed_selective == forced


def test_lora_trains_under_the_chosen_policy(probed, tokenizer, dataset, tmp_path, use_settings):
    peft = pytest.importorskip("peft")
    use_settings(memory_budget_gb=64.0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(tokenizer, dataset, _config(tmp_path, max_steps=2), peft_config=config)
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert policy.last_decision().policy == "none"
    assert all(l == l for l in losses(trainer))
    changed = [n for n, p in trainer.model.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert changed
