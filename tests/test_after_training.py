"""What users do next: generate(), evaluate() and predict() after (and during) a patched train().

The model leaves training as the user gave it; inside training, every call the varlen attention
cannot take exactly (padded batches, cached decoding) runs on the model's own attention.
"""

from __future__ import annotations

import pytest
import torch

import unsloth_patch
from unsloth_patch.collate import PaddingFreeCollator
from unsloth_patch.layers import is_fused
from unsloth_patch.tiny import build_model

from .helpers import losses, sft_config, sft_trainer, text_dataset, train_collator, use_settings  # noqa: F401

PROMPTS = ["hello there, how are", "what do you", "i think that the weather today is"]


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=24)


@pytest.fixture(autouse=True)
def flatten(use_settings):
    use_settings(padding_free="on")  # the padding-free path, also on this CPU


def _model(tokenizer, seed=0):
    return build_model("llama", vocab_size=len(tokenizer), seed=seed)


def _stock_copy(tokenizer, model):
    """A model the plugin never touched, holding ``model``'s current weights."""
    copy = _model(tokenizer, seed=1)
    copy.load_state_dict(model.state_dict())
    return copy.to(model.device).eval()


def _generate(model, tokenizer, prompts, use_cache):
    """Greedy continuation of ``prompts``: (token ids per row, the scores of every generated step)."""
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    batch = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                             pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
    return out.sequences.tolist(), [s.float().cpu() for s in out.scores]


# After train(), accelerate's mixed-precision wrapper stays on the trained model's forward (as in a
# stock run: TRL 1.x trains in bf16 by default), while the stock copy computes in float32; their
# scores differ by bf16 rounding, and a greedy step whose best two scores are that close may go
# either way.
CLOSE = 2e-2
TIE = 2e-2


def _assert_same_generation(model, stock, tokenizer, prompts, use_cache):
    """The same tokens as the stock copy's, up to a step where greedy decoding is a near-tie between
    two tokens (a tiny random model has many); up to there the scores agree."""
    ours, ours_scores = _generate(model, tokenizer, prompts, use_cache)
    theirs, theirs_scores = _generate(stock, tokenizer, prompts, use_cache)
    new = len(theirs_scores)
    for row, (a, b) in enumerate(zip(ours, theirs)):
        for step in range(new):
            position = len(b) - new + step
            assert torch.allclose(ours_scores[step][row], theirs_scores[step][row], atol=CLOSE, rtol=CLOSE), (row, step)
            if a[position] != b[position]:
                top = theirs_scores[step][row].topk(2).values
                assert float(top[0] - top[1]) < TIE, (prompts, use_cache, row, step, a, b)
                break  # after a tie the continuations may differ
        else:
            assert a == b


CASES = [pytest.param(prompts, cache, id=f"{name}-{'cache' if cache else 'nocache'}")
         for name, prompts in (("one-unpadded-prompt", PROMPTS[:1]), ("left-padded-batch", PROMPTS))
         for cache in (True, False)]


@pytest.mark.parametrize("prompts, use_cache", CASES)
def test_generate_after_training_gives_the_stock_models_tokens(prompts, use_cache, tokenizer, dataset, tmp_path):
    model = _model(tokenizer)
    trainer = sft_trainer(model, tokenizer, dataset, sft_config(tmp_path, max_length=64, max_steps=3))
    assert isinstance(train_collator(trainer), PaddingFreeCollator)
    implementation = model.config._attn_implementation
    trainer.train()
    assert model.config._attn_implementation == implementation
    # no instance edit of ours outlives train() (TRL's or accelerate's wrapper of the top-level forward may)
    assert not [name for name, m in model.named_modules() if name and "forward" in vars(m)]
    assert not any(is_fused(m) for m in model.modules())
    model.eval()
    _assert_same_generation(model, _stock_copy(tokenizer, model), tokenizer, prompts, use_cache)


def test_generate_inside_training_runs_on_the_models_own_attention(tokenizer, dataset, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class GenerateEachStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            model = trainer.model
            seen.append(model.config._attn_implementation)
            was_training = model.training
            model.eval()
            for prompts in (PROMPTS[:1], PROMPTS):
                for cache in (True, False):
                    _assert_same_generation(model, _stock_copy(tokenizer, model), tokenizer, prompts, cache)
            model.train(was_training)

    trainer = sft_trainer(_model(tokenizer), tokenizer, dataset, sft_config(tmp_path, max_length=64, max_steps=2),
                          callbacks=[GenerateEachStep()])
    trainer.train()
    attention = unsloth_patch.last_plan().attention
    # really the varlen model (on transformers without AttentionInterface, our kernels live in its FA2 classes)
    assert len(seen) == 2 and seen[0] == ("flash_attention_2" if attention == "legacy-varlen" else attention)
    assert len(losses(trainer)) == 2


def _metrics(prediction):
    logits, labels = prediction
    logits = logits[0] if isinstance(logits, tuple) else logits
    keep = labels[:, 1:] != -100
    guesses = logits[:, :-1].argmax(-1)
    return {"accuracy": float((guesses[keep] == labels[:, 1:][keep]).mean()), "tokens": int(keep.sum())}


def _predicted(prediction):
    return prediction.predictions if isinstance(prediction.predictions, tuple) else (prediction.predictions,)


# TRL 1.7-1.14 default to loss_type="chunked_nll", whose forward (stock) returns the loss and per-batch
# token counts but no logits when given labels: predict() there has no [B, L, V] logits to compute
# metrics on. Its default is checked for stock-shaped predictions, and "nll" (the loss that returns
# logits) for the logits and the metrics; elsewhere the default loss returns logits.
@pytest.mark.parametrize("loss_type", [None, "nll"], ids=["default-loss", "nll-loss"])
def test_predict_and_metrics_after_training_are_stock_shaped(loss_type, tokenizer, dataset, tmp_path):
    chunked = getattr(sft_config(tmp_path / "defaults"), "loss_type", None) == "chunked_nll"
    if loss_type is not None and not chunked:
        pytest.skip("this TRL's default loss returns logits: the default-loss case checks them")
    with_logits = not (chunked and loss_type is None)
    extra = {"loss_type": loss_type} if loss_type else {}
    evaluation = text_dataset(tokenizer, limit=10)  # 10 rows, batch 4: a short last batch
    results = {}
    for mode in ("stock", "patched"):
        if mode == "stock":
            unsloth_patch.remove()
        try:
            trainer = sft_trainer(_model(tokenizer), tokenizer, dataset,
                                  sft_config(tmp_path / mode, max_length=64, max_steps=3, learning_rate=1e-4,
                                             per_device_eval_batch_size=4, bf16=False, **extra),  # fp32: 1e-4 below
                                  eval_dataset=evaluation, compute_metrics=_metrics if with_logits else None)
            if mode == "patched":
                assert isinstance(train_collator(trainer), PaddingFreeCollator)
            trainer.train()
            prediction = trainer.predict(trainer.eval_dataset)
            results[mode] = (prediction, trainer.evaluate(), losses(trainer))
        finally:
            if mode == "stock":
                unsloth_patch.apply()
    (stock, stock_eval, stock_losses), (ours, our_eval, our_losses) = results["stock"], results["patched"]
    assert [a.shape for a in _predicted(ours)] == [a.shape for a in _predicted(stock)]
    assert ours.label_ids.shape == stock.label_ids.shape and stock.label_ids.shape[0] == 10
    assert (ours.label_ids != -100).sum() == (stock.label_ids != -100).sum()
    if with_logits:
        assert _predicted(stock)[0].shape[:2] == stock.label_ids.shape  # [B, L, V] logits
        assert ours.metrics["test_tokens"] == stock.metrics["test_tokens"]
        assert abs(ours.metrics["test_accuracy"] - stock.metrics["test_accuracy"]) <= 1e-6
    for a, b in zip(stock_losses, our_losses):
        assert abs(a - b) <= 1e-4 * abs(a)
    assert abs(our_eval["eval_loss"] - stock_eval["eval_loss"]) <= 1e-4 * abs(stock_eval["eval_loss"])


@pytest.mark.newest_only  # about a minute of CPU compilation; the contract does not depend on the TRL version
def test_torch_compile_trains_with_the_uncompiled_losses(tokenizer, dataset, tmp_path):
    from trl import SFTConfig

    from .helpers import config_fields

    if "torch_compile" not in config_fields(SFTConfig):
        pytest.skip("this TRL has no torch_compile")
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        trainer = sft_trainer(_model(tokenizer), tokenizer, dataset,
                              sft_config(tmp_path / str(compiled), max_length=48, max_steps=3, learning_rate=1e-4,
                                         torch_compile=compiled))
        assert isinstance(train_collator(trainer), PaddingFreeCollator)
        trainer.train()
        runs[compiled] = losses(trainer)
    assert len(runs[True]) == len(runs[False]) == 3
    for a, b in zip(runs[False], runs[True]):
        assert abs(a - b) <= 1e-4 * abs(a), runs
