"""LoRA layers under autocast keep their input in the compute dtype: PEFT's float32 copy, which the
adapter's matmul casts straight back, is not made, no number changes, fewer bytes are saved for
the backward, and anything outside that case is PEFT's own cast."""

from __future__ import annotations

import collections

import pytest
import torch

from unsloth_patch import lora_inputs
from unsloth_patch.edits import Edits
from unsloth_patch.tiny import build_model

from .helpers import losses, sft_config, sft_trainer, use_settings  # noqa: F401  (a fixture)

peft = pytest.importorskip("peft")


def _lora_model(dtype=torch.bfloat16, dropout=0.0, **lora):
    torch.manual_seed(0)
    base = build_model("llama", hidden_size=64, intermediate_size=192, num_layers=2, seed=0).to(dtype)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                             task_type="CAUSAL_LM", **lora)
    model = peft.get_peft_model(base, config)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # zero at init: random, so that the adapters take part in every number
            torch.nn.init.normal_(parameter, std=0.1)
    return model


def _step(model, ids, autocast: bool):
    """Loss, gradients and what autograd saved for the backward: (dtype, shape) of each distinct storage."""
    model.zero_grad()
    storages, saved = set(), collections.Counter()

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in storages:
            storages.add(tensor.untyped_storage().data_ptr())
            saved[(tensor.dtype, tuple(tensor.shape))] += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved


def test_under_autocast_no_number_changes_and_less_is_saved_for_the_backward():
    model = _lora_model()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT's default
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    loss, grads, saved = _step(model, ids, autocast=True)
    edits = Edits()
    outcome = lora_inputs.keep_input_dtype(model, edits)
    assert outcome["edited"] == 14 and outcome["kept"] == {} and outcome["reason"] == "edited"  # 7 per layer
    edited_loss, edited_grads, edited_saved = _step(model, ids, autocast=True)
    assert torch.equal(loss, edited_loss)
    assert grads.keys() == edited_grads.keys() and all(torch.equal(grads[k], edited_grads[k]) for k in grads)
    assert not edited_saved - saved  # nothing saved that was not saved before
    copies = saved - edited_saved  # bf16 copies of the adapters' inputs (80 tokens), saved no longer
    assert copies and all(dtype == torch.bfloat16 and shape[0] == 80 for dtype, shape in copies)
    edits.rollback()
    assert not any("_cast_input_dtype" in vars(m) for m in model.modules())  # the class's method again
    assert torch.equal(_step(model, ids, autocast=True)[0], loss)


def test_without_autocast_the_input_is_cast_as_peft_casts_it():
    model = _lora_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    loss, grads, _ = _step(model, ids, autocast=False)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
             for name, m in model.named_modules() if name.endswith("lora_A.default")]
    edits = Edits()
    lora_inputs.keep_input_dtype(model, edits)
    edited_loss, edited_grads, _ = _step(model, ids, autocast=False)
    assert seen and set(seen) == {torch.float32}  # PEFT's copy, as without the edit
    assert torch.equal(loss, edited_loss) and all(torch.equal(grads[k], edited_grads[k]) for k in grads)
    seen.clear()
    _step(model, ids, autocast=True)
    assert set(seen) == {torch.bfloat16}  # under autocast the adapters get the input itself
    for hook in hooks:
        hook.remove()
    edits.rollback()


def test_layers_whose_input_matters_beyond_the_matmul_keep_peft_cast():
    with_dropout = _lora_model(dropout=0.1)
    outcome = lora_inputs.keep_input_dtype(with_dropout, Edits())
    assert outcome["edited"] == 0 and outcome["reason"] == "no eligible LoRA layer"
    assert all("lora_dropout > 0" in why for why in outcome["kept"].values()) and len(outcome["kept"]) == 14
    dora = _lora_model(use_dora=True)
    outcome = lora_inputs.keep_input_dtype(dora, Edits())
    assert outcome["edited"] == 0 and all("variant" in why for why in outcome["kept"].values())
    plain = build_model("llama", hidden_size=64, num_layers=1)
    assert lora_inputs.keep_input_dtype(plain, Edits()) == {"edited": 0, "kept": {}, "reason": "no LoRA layer"}


def test_a_second_edit_of_the_same_layer_is_refused_and_rollback_restores_peft():
    model = _lora_model()
    edits = Edits()
    assert lora_inputs.keep_input_dtype(model, edits)["edited"] == 14
    again = lora_inputs.keep_input_dtype(model, Edits())
    assert again["edited"] == 0 and all("already replaced" in why for why in again["kept"].values())
    edits.rollback()
    assert lora_inputs.keep_input_dtype(model, Edits())["edited"] == 14


def test_sft_trainer_lora_layers_are_edited_for_train_only_and_the_toggle_turns_it_off(
        tokenizer, tmp_path, use_settings):
    from unsloth_patch.tiny import chat_dataset

    dataset = chat_dataset(tokenizer, limit=8, format="text")

    def train(**settings):
        if settings:
            use_settings(**settings)
        model = build_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, seed=0)
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "down_proj"],
                                 task_type="CAUSAL_LM")
        args = sft_config(tmp_path, max_length=32, max_steps=3, bf16=False)
        trainer = sft_trainer(model, tokenizer, dataset, args, peft_config=config)
        trainer.train()
        assert not any("_cast_input_dtype" in vars(m) for m in trainer.model.modules())  # only while training
        return losses(trainer), lora_inputs.last()

    edited_losses, outcome = train()
    assert outcome["edited"] == 4 and outcome["reason"] == "edited"  # q and down of 2 layers
    kept_losses, off = train(kernels_off=("lora_cast",))
    assert off["edited"] == 0 and "KERNELS_OFF=lora_cast" in off["reason"]
    assert edited_losses == kept_losses  # fp32 here: the edit leaves PEFT's cast in place, the run the same
