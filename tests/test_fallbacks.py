"""A part of ours that fails during training: the run completes with stock behaviour and one warning.

Each test injects an exception into one run-time component — the collator, the attention, the
fused layers, the checkpoint functions, the probe, the training edits — and checks that
training finishes with the stock run's losses and that the user was told once what failed.
"""

from __future__ import annotations

import logging

import pytest

import unsloth_patch
from unsloth_patch import checkpointing as policy
from unsloth_patch import fallback, layers
from unsloth_patch import log as plugin_log_module
from unsloth_patch.patches import checkpointing as wiring
from unsloth_patch.patches import training_edits
from unsloth_patch.tiny import build_model

from .helpers import fusion_on_this_cpu, losses, plugin_log, sft_config, sft_trainer, text_dataset, use_settings  # noqa: F401,E501

# fp32 (several TRL versions default to bf16=True): the losses are compared with stock at 1e-4, which a
# bf16 CPU autocast run on another attention path does not hold (seen on CPUs with AMX)
CONFIG = dict(max_length=64, max_steps=3, learning_rate=1e-4, bf16=False)


def injected(*args, **kwargs):
    raise RuntimeError("injected fault")


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=24)


@pytest.fixture(autouse=True)
def fresh(use_settings):
    use_settings(padding_free="on")
    fallback.reset()
    plugin_log_module.forget()
    yield
    fallback.reset()


@pytest.fixture(scope="module")
def stock_losses(tokenizer, dataset, tmp_path_factory):
    unsloth_patch.remove()
    try:
        trainer = sft_trainer(build_model("llama", vocab_size=len(tokenizer), seed=0), tokenizer, dataset,
                              sft_config(tmp_path_factory.mktemp("stock"), **CONFIG))
        trainer.train()
        return losses(trainer)
    finally:
        unsloth_patch.apply()


def _train_and_check(tokenizer, dataset, tmp_path, caplog, stock_losses, component, **config):
    with plugin_log(caplog, logging.WARNING):
        trainer = sft_trainer(build_model("llama", vocab_size=len(tokenizer), seed=0), tokenizer, dataset,
                              sft_config(tmp_path, **{**CONFIG, **config}))
        trainer.train()
    got = losses(trainer)
    assert len(got) == len(stock_losses)
    for a, b in zip(stock_losses, got):
        assert abs(a - b) <= 1e-4 * abs(a), (stock_losses, got)
    said = [r.getMessage() for r in caplog.records if "injected fault" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(component), said
    assert "rest of this run" in said[0]
    assert component in fallback.failures()
    return trainer


def test_collator_failure_gives_padded_batches(tokenizer, dataset, tmp_path, caplog, stock_losses, monkeypatch):
    from unsloth_patch import collate

    monkeypatch.setattr(collate, "flatten_batch", injected)
    trainer = _train_and_check(tokenizer, dataset, tmp_path, caplog, stock_losses, collate.COMPONENT)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" in batch and batch["input_ids"].shape[0] == 4  # TRL's padded batch


def test_attention_failure_runs_the_models_own_attention(tokenizer, dataset, tmp_path, caplog, stock_losses,
                                                         monkeypatch):
    from unsloth_patch.attention import dispatch, legacy

    monkeypatch.setattr(dispatch, "run_varlen", injected)
    monkeypatch.setattr(legacy, "run_varlen", injected)
    _train_and_check(tokenizer, dataset, tmp_path, caplog, stock_losses, dispatch.COMPONENT)


def _gated_reference(gate, up, kind):
    import torch.nn.functional as F

    return (F.silu(gate) if kind == "silu" else F.gelu(gate, approximate="tanh")) * up


def test_fused_rmsnorm_failure_runs_the_modules_forward(tokenizer, dataset, tmp_path, caplog, stock_losses,
                                                        monkeypatch, fusion_on_this_cpu):
    from unsloth_patch.kernels import rmsnorm, swiglu

    monkeypatch.setattr(rmsnorm, "rms_norm", injected)
    monkeypatch.setattr(swiglu, "gated_activation", _gated_reference)
    _train_and_check(tokenizer, dataset, tmp_path, caplog, stock_losses, layers.RMSNORM)
    assert layers.last_fusion()["fused"].get("rmsnorm")  # the fused forwards really were in place


def test_fused_mlp_failure_runs_the_modules_act_fn(tokenizer, dataset, tmp_path, caplog, stock_losses,
                                                   monkeypatch, fusion_on_this_cpu):
    from unsloth_patch.kernels import rmsnorm, swiglu

    mlp = build_model("llama", vocab_size=len(tokenizer), seed=0).model.layers[0].mlp
    kind, reason = layers._mlp_activation(mlp)
    if kind is None:  # transformers 4.46's LlamaMLP.forward carries a pretraining_tp branch: never fused there
        assert "forward is not" in reason, reason
        pytest.skip(f"no fused MLP on this transformers to fail ({reason})")
    monkeypatch.setattr(swiglu, "gated_activation", injected)
    monkeypatch.setattr(rmsnorm, "rms_norm", rmsnorm.rms_norm_reference)
    _train_and_check(tokenizer, dataset, tmp_path, caplog, stock_losses, layers.GATED_MLP)
    assert layers.last_fusion()["fused"].get("swiglu")


@pytest.mark.parametrize("chosen, component", [("selective", "selective checkpointing"),
                                               ("offload", "offloaded checkpointing")])
def test_checkpoint_function_failure_falls_back_to_plain_checkpointing(chosen, component, tokenizer, dataset,
                                                                       tmp_path, caplog, stock_losses, monkeypatch,
                                                                       use_settings):
    import torch.utils.checkpoint as torch_checkpoint

    if chosen == "selective" and not policy.selective_available():
        pytest.skip("this torch has no selective activation checkpointing")
    use_settings(memory_budget_gb=8.0)
    monkeypatch.setattr(wiring, "explicit_reason", lambda args: None)  # checkpointing is TRL's default here
    monkeypatch.setattr(wiring, "checkpointing_on", lambda args: True)
    monkeypatch.setattr(wiring, "_decide_locally", lambda trainer, settings: policy.Decision(
        chosen, "injected decision", probed=True))
    if chosen == "selective":
        monkeypatch.setattr(policy.functions, "selective_context", injected)
    else:
        monkeypatch.setattr(policy.functions, "_offload_pack", injected)
    real = torch_checkpoint.checkpoint
    calls = []
    monkeypatch.setattr(torch_checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    _train_and_check(tokenizer, dataset, tmp_path, caplog, stock_losses, component)
    assert calls  # the layers really were checkpointed, plainly, after the failure


def test_probe_failure_keeps_trls_checkpointing(tokenizer, dataset, tmp_path, caplog, stock_losses, monkeypatch,
                                                use_settings):
    use_settings(memory_budget_gb=8.0)
    monkeypatch.setattr(wiring, "explicit_reason", lambda args: None)
    monkeypatch.setattr(wiring, "checkpointing_on", lambda args: True)
    monkeypatch.setattr(policy, "measure", injected)
    with plugin_log(caplog, logging.WARNING):
        trainer = sft_trainer(build_model("llama", vocab_size=len(tokenizer), seed=0), tokenizer, dataset,
                              sft_config(tmp_path, **CONFIG))
        trainer.train()
    for a, b in zip(stock_losses, losses(trainer)):
        assert abs(a - b) <= 1e-4 * abs(a)
    said = [r.getMessage() for r in caplog.records if "injected fault" in r.getMessage()]
    assert len(said) == 1 and "probe failed" in said[0]
    decision = policy.last_decision()
    assert decision.policy == "full" and "probe failed" in decision.reason


def test_training_edits_failure_trains_the_model_as_given(tokenizer, dataset, tmp_path, caplog, stock_losses,
                                                          monkeypatch):
    monkeypatch.setattr(training_edits, "apply_model_edits", injected)
    trainer = _train_and_check(tokenizer, dataset, tmp_path, caplog, stock_losses, training_edits.COMPONENT)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" in batch  # the flat batches needed the edits: padded ones instead


def test_a_failure_is_reported_by_the_report_command(capsys):
    import unsloth_patch.__main__ as cli

    fallback.failed("varlen attention", RuntimeError("injected fault"))
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "fallbacks:" in out and "varlen attention: RuntimeError: injected fault" in out
