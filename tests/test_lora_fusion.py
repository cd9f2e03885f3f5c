"""LoRA layers as one autograd node, siblings of one input as one: PEFT's numbers, PEFT's adapters.

The fused projections are checked against a float64 autograd reference and against PEFT's own
modules (fp32: every loss and gradient; bf16 autocast: close); sibling groups (q/k/v, gate/up) are
used only for the very same input; every state PEFT can be put in during training (adapters
disabled, merged, another adapter, hooks, dropout) gives PEFT's result; a trained adapter saves,
reloads and merges as PEFT's own.
"""

from __future__ import annotations

import pytest
import torch

from unsloth_patch import fallback, lora_fusion
from unsloth_patch.edits import Edits
from unsloth_patch.kernels import lora_linear, projection
from unsloth_patch.kernels.lora_linear import Projection, projections
from unsloth_patch.tiny import build_model

from .helpers import losses, sft_config, sft_trainer, use_settings  # noqa: F401  (a fixture)

peft = pytest.importorskip("peft")


def _reference(x, p, lora_input=None):
    y = x @ p.weight.T
    if p.bias is not None:
        y = y + p.bias
    if p.lora_a is not None:
        y = y + ((x if lora_input is None else lora_input) @ p.lora_a.T) @ p.lora_b.T * p.scaling
    return y


def _projection(generator, out, d_in, rank=0, bias=False, trained=False, dtype=torch.float64):
    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_(grad)

    return Projection(rand(out, d_in, grad=trained), rand(rank, d_in) if rank else None,
                      rand(out, rank) if rank else None, 0.35 if rank else 1.0, rand(out) if bias else None)


def _leaves(x, parts):
    return [x] + [t for p in parts for t in p if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("layout", ["one", "qkv", "mixed"])
def test_projections_match_autograd_in_float64(layout):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 29, 24, generator=g, dtype=torch.float64, requires_grad=True)
    parts = {"one": [_projection(g, 16, 24, rank=4)],
             "qkv": [_projection(g, 16, 24, rank=4), _projection(g, 8, 24, rank=4), _projection(g, 8, 24, rank=4)],
             "mixed": [_projection(g, 16, 24, rank=4, bias=True), _projection(g, 8, 24, rank=2, trained=True),
                       _projection(g, 5, 24, bias=True, trained=True)]}[layout]
    ours = projections(x, parts)
    expected = [_reference(x, p) for p in parts]
    grads = [torch.randn(y.shape, generator=g, dtype=torch.float64) for y in expected]
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    leaves = _leaves(x, parts)
    for got, want in zip(torch.autograd.grad(ours, leaves, grads), torch.autograd.grad(expected, leaves, grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_unused_outputs_and_a_separate_adapter_input():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 12, generator=g, dtype=torch.float64, requires_grad=True)
    parts = [_projection(g, 6, 12, rank=3), _projection(g, 4, 12, rank=2)]
    q, k = projections(x, parts)
    leaves = _leaves(x, parts)
    got = torch.autograd.grad(q.sum(), leaves, allow_unused=True)  # k's gradient never comes
    want = torch.autograd.grad(_reference(x, parts[0]).sum(), leaves, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b))
    dropped = x * 0.5 + 0.1  # the adapter's own input (after dropout, say): its gradient flows back to x
    one = parts[:1]
    ours = projections(x, one, lora_input=dropped)[0]
    expected = _reference(x, one[0], lora_input=dropped)
    torch.testing.assert_close(ours, expected)
    leaves = _leaves(x, one)
    for a, b in zip(torch.autograd.grad(ours.sum(), leaves, retain_graph=True),
                    torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(a, b)


def test_bad_arguments_are_named():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g)
    p = _projection(g, 4, 8, rank=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="at least one"):
        projections(x, [])
    with pytest.raises(ValueError, match="lora_a and lora_b come together"):
        projections(x, [p._replace(lora_b=None)])
    with pytest.raises(ValueError, match="takes 8 features, x has 5"):
        projections(x[:, :5], [p])
    with pytest.raises(ValueError, match="goes with one adapted projection"):
        projections(x, [p, p], lora_input=x)
    with pytest.raises(ValueError, match="lora_input has shape"):
        projections(x, [p], lora_input=x[:2])


# ----------------------------------------------------------------------------- against PEFT's modules


def _lora_model(family="llama", dropout=0.0, dtype=torch.float32, **lora):
    base = build_model(family, hidden_size=64, intermediate_size=160, num_layers=2, seed=0).to(dtype)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                             task_type="CAUSAL_LM", **lora)
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # zero at init: random, so that the adapters take part in every number
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _step(model, ids, autocast=False, seed=None):
    model.zero_grad()
    if seed is not None:
        torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _ids(model, batch=2, length=24, seed=1):
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _counting(monkeypatch):
    calls = []
    original = lora_linear.projections

    def counted(x, parts, *args, **kwargs):
        calls.append(len(parts))  # how many projections that call computed
        return original(x, parts, *args, **kwargs)

    monkeypatch.setattr(lora_linear, "projections", counted)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biases on q/k/v
def test_fused_layers_give_peft_losses_and_gradients_in_fp32_with_siblings_in_one_node(family, monkeypatch):
    model = _lora_model(family)
    ids = _ids(model)
    loss, grads = _step(model, ids)
    edits = Edits()
    outcome = lora_fusion.fuse(model, edits)
    assert outcome == {"fused": 14, "grouped": 10, "kept": {}, "reason": "fused"}  # q/k/v and gate/up per layer
    calls = _counting(monkeypatch)
    fused_loss, fused_grads = _step(model, ids)
    assert sorted(calls) == [1, 1, 1, 1, 2, 2, 3, 3]  # per layer: q/k/v, o, gate/up, down
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    assert fused_grads.keys() == grads.keys() and len(grads) == 28  # every adapter, nothing else
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    edits.rollback()
    assert not any(lora_fusion.is_fused(m) or lora_fusion.GROUP in vars(m) for m in model.modules())
    again, _ = _step(model, ids)
    assert torch.equal(again, loss)


def test_rslora_scaling_is_peft_s():
    model = _lora_model(use_rslora=True)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / 8 ** 0.5)  # alpha / sqrt(r), not alpha / r
    ids = _ids(model)
    loss, grads = _step(model, ids)
    lora_fusion.fuse(model, Edits())
    fused_loss, fused_grads = _step(model, ids)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _saved_bytes(model, ids):
    """Bytes of the distinct storages autograd saves for one bf16-autocast forward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids)
    return sum(storages.values())


def test_under_bf16_autocast_close_to_peft_and_less_is_saved_for_the_backward():
    model = _lora_model()
    ids = _ids(model)
    loss, grads = _step(model, ids, autocast=True)
    peft_saved = _saved_bytes(model, ids)
    lora_fusion.fuse(model, Edits())
    fused_saved = _saved_bytes(model, ids)
    fused_loss, fused_grads = _step(model, ids, autocast=True)
    torch.testing.assert_close(fused_loss, loss, rtol=2e-2, atol=0)
    for name in grads:
        scale = grads[name].norm()
        assert (fused_grads[name] - grads[name]).norm() <= 0.05 * scale + 1e-6, name
    assert fused_saved < peft_saved, (peft_saved, fused_saved)  # nothing saved that PEFT's graph does not hold


def test_dropout_layers_draw_peft_masks_and_stay_out_of_groups(monkeypatch):
    model = _lora_model(dropout=0.3)
    model.train()
    ids = _ids(model)
    loss, grads = _step(model, ids, seed=11)
    outcome = lora_fusion.fuse(model, Edits())
    assert outcome["fused"] == 14
    calls = _counting(monkeypatch)
    fused_loss, fused_grads = _step(model, ids, seed=11)
    assert calls == [1] * 14  # each with its own dropout mask: no shared input
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_every_state_peft_can_be_put_in_gives_peft_results(monkeypatch):
    model = _lora_model()
    model.eval()
    ids = _ids(model)

    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits

    adapted = logits()
    with model.disable_adapter():
        base = logits()
    lora_fusion.fuse(model, Edits())
    calls = _counting(monkeypatch)
    torch.testing.assert_close(logits(), adapted, rtol=1e-5, atol=1e-5)
    assert calls
    calls.clear()
    with model.disable_adapter():
        torch.testing.assert_close(logits(), base, rtol=1e-5, atol=1e-5)
    assert not calls  # disabled: PEFT's forward, the base layer alone
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = []
    handle = model.base_model.model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda module, args, out: seen.append(out.shape))
    torch.testing.assert_close(logits(), adapted, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert seen == [torch.Size([2, 24, 32])]  # the hook ran; k computed apart from its group
    q.scaling["default"] = 0.0  # set_scale and the like: read at every call
    scaled = logits()
    q.scaling["default"] = 2.0
    assert not torch.allclose(scaled, adapted)
    model.merge_adapter()
    calls.clear()
    merged = logits()
    assert not calls  # merged: PEFT's forward
    model.unmerge_adapter()
    torch.testing.assert_close(logits(), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_a_sibling_called_with_another_input_computes_its_own():
    model = _lora_model()
    attention = model.base_model.model.model.layers[0].self_attn
    lora_fusion.fuse(model, Edits())
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    y = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q = attention.q_proj(x)  # computes k and v of x too, left for k_proj(x)
        k_other = attention.k_proj(y)
        k_same = attention.k_proj(x)
        x.mul_(2)  # the same tensor, changed: v of the old x must not be handed out
        v_changed = attention.v_proj(x)
    with torch.no_grad(), _peft_forward(attention):
        torch.testing.assert_close(q, attention.q_proj(x / 2))
        torch.testing.assert_close(k_other, attention.k_proj(y))
        torch.testing.assert_close(k_same, attention.k_proj(x / 2))
        torch.testing.assert_close(v_changed, attention.v_proj(x))


class _peft_forward:
    """PEFT's own forward on the attention's projections for the block."""

    def __init__(self, attention):
        self.modules = [attention.q_proj, attention.k_proj, attention.v_proj]

    def __enter__(self):
        self.saved = [vars(m).pop("forward") for m in self.modules]

    def __exit__(self, *exc):
        for m, f in zip(self.modules, self.saved):
            m.forward = f


def test_layers_left_to_peft_carry_their_reason():
    model = _lora_model(use_dora=True)
    outcome = lora_fusion.fuse(model, Edits())
    assert outcome["fused"] == 0 and outcome["reason"] == "no eligible LoRA layer"
    assert len(outcome["kept"]) == 14 and all("DoRA" in why for why in outcome["kept"].values())
    plain = build_model("llama", num_layers=1, seed=0)
    assert lora_fusion.fuse(plain, Edits()) == {"fused": 0, "grouped": 0, "kept": {}, "reason": "no LoRA layer"}
    assert lora_fusion.read(torch.nn.Conv1d(4, 3, 1))[2] == "Conv1d is not a plain nn.Linear"
    assert lora_fusion.read(torch.nn.Linear(4, 3), bias=False)[2] == "has a bias"


def test_a_failing_fused_forward_falls_back_to_peft_once(monkeypatch):
    model = _lora_model()
    ids = _ids(model)
    loss, _ = _step(model, ids)
    lora_fusion.fuse(model, Edits())

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(lora_linear, "projections", broken)
    try:
        fallback_loss, _ = _step(model, ids)
        assert not fallback.enabled(lora_fusion.FUSED_LORA)
        assert "kernel exploded" in fallback.failures()[lora_fusion.FUSED_LORA]
    finally:
        fallback.reset(lora_fusion.FUSED_LORA)
    assert torch.equal(fallback_loss, loss)


# ----------------------------------------------------------------------------- through SFTTrainer


def _train(tokenizer, dataset, tmp_path, family, use_settings, dropout=0.0, **settings):
    if settings:
        use_settings(**settings)
    model = build_model(family, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, seed=0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    args = sft_config(tmp_path, max_length=48, max_steps=6, bf16=False, learning_rate=5e-3)
    trainer = sft_trainer(model, tokenizer, dataset, args, peft_config=config)
    trainer.train()
    assert not any(lora_fusion.is_fused(m) for m in trainer.model.modules())  # only while training
    return trainer, losses(trainer), lora_fusion.last()


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biased q/k/v; on every transformers
def test_sft_trainer_lora_losses_equal_peft_and_the_adapter_saves_reloads_and_merges(
        family, tokenizer, tmp_path, use_settings):
    from unsloth_patch.tiny import chat_dataset

    dataset = chat_dataset(tokenizer, limit=24, format="text")
    trainer, fused, outcome = _train(tokenizer, dataset, tmp_path / "a", family, use_settings)
    assert outcome["fused"] == 14 and outcome["grouped"] == 10, outcome
    from unsloth_patch.__main__ import _here

    assert any("LoRA layers fused: 14, 10 of them in sibling groups (fused)" in line for line in _here()), _here()
    _, stock, off = _train(tokenizer, dataset, tmp_path / "b", family, use_settings, kernels_off=("lora",))
    assert off["fused"] == 0 and "KERNELS_OFF=lora" in off["reason"]
    assert len(fused) == len(stock) == 6
    for a, b in zip(fused, stock):
        assert abs(a - b) <= 1e-4 * abs(b), (fused, stock)

    model = trainer.model
    model.eval()
    ids = torch.randint(3, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(4)).to(model.device)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    base = build_model(family, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, seed=0)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_sft_trainer_with_dropout_trains_fused(tokenizer, tmp_path, use_settings):
    from unsloth_patch.tiny import chat_dataset

    dataset = chat_dataset(tokenizer, limit=16, format="text")
    _, fused, outcome = _train(tokenizer, dataset, tmp_path / "a", "llama", use_settings, dropout=0.1)
    assert outcome["fused"] == 14 and outcome["grouped"] == 10  # grouped at wiring; dropout layers run alone
    _, stock, _ = _train(tokenizer, dataset, tmp_path / "b", "llama", use_settings, dropout=0.1,
                         kernels_off=("lora",))
    for a, b in zip(fused, stock):
        assert abs(a - b) <= 1e-4 * abs(b), (fused, stock)


@pytest.mark.newest_only  # version-independent (torch and PEFT only): once, in the session with the newest pins
def test_under_torch_compile_peft_forward_is_traced_and_losses_match():
    model = _lora_model()
    ids = _ids(model)
    loss, grads = _step(model, ids)
    lora_fusion.fuse(model, Edits())
    compiled = torch.compile(model, backend="aot_eager")
    model.zero_grad()
    compiled_loss = compiled(input_ids=ids, labels=ids).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss.detach(), loss, rtol=1e-5, atol=0)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- 4-bit bases (QLoRA)


def _qlora_model(compute_dtype=torch.bfloat16, dtype=torch.bfloat16, intermediate_size=160):
    bnb = pytest.importorskip("bitsandbytes")
    base = build_model("llama", hidden_size=64, intermediate_size=intermediate_size, num_layers=2, seed=0).to(dtype)

    def quantize(module):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and name != "lm_head":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                setattr(module, name, layer.to(child.weight.device))
            else:
                quantize(child)

    quantize(base)
    base.is_loaded_in_4bit = True  # as transformers marks a model it loaded in 4 bits: PEFT's 4-bit LoRA layers
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def test_a_4bit_base_dequantises_bit_for_bit_as_bitsandbytes_and_trains_as_peft(monkeypatch):
    model = _qlora_model()  # skips without bitsandbytes
    from bitsandbytes.functional import dequantize_4bit

    ids = _ids(model)
    loss, grads = _step(model, ids, autocast=True)
    outcome = lora_fusion.fuse(model, Edits())
    assert outcome == {"fused": 14, "grouped": 10, "kept": {}, "reason": "fused"}
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    part, _, _ = lora_fusion.read(q)
    assert part.quant_state is q.base_layer.weight.quant_state and part.in_features == 64
    assert torch.equal(projection.dense_weight(part.weight, part.quant_state, torch.bfloat16),
                       dequantize_4bit(q.base_layer.weight, q.base_layer.weight.quant_state).to(torch.bfloat16))
    calls = _counting(monkeypatch)
    fused_loss, fused_grads = _step(model, ids, autocast=True)
    assert sorted(calls) == [1, 1, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(fused_loss, loss, rtol=1e-2, atol=0)  # bf16: PEFT rounds its sums differently
    for name in grads:
        assert (fused_grads[name] - grads[name]).norm() <= 0.05 * grads[name].norm() + 1e-6, name
    with pytest.raises(ValueError, match="4-bit base weight cannot be trained"):
        projections(torch.randn(2, 64), [part._replace(weight=part.weight.float().requires_grad_())])


@pytest.mark.parametrize("nested", [True, False])
def test_4bit_scales_are_dequantised_once_and_the_weight_stays_bit_for_bit_bitsandbytes(nested, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes import functional
    from unsloth_patch.kernels import projection

    dense = torch.randn(96, 64, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=nested)
    weight = weight._quantize("cpu") if not hasattr(weight, "quant_state") or weight.quant_state is None else weight
    state = weight.quant_state
    expected = functional.dequantize_4bit(weight.data, state).to(torch.bfloat16)
    calls = []
    real = functional.dequantize_blockwise
    monkeypatch.setattr(functional, "dequantize_blockwise", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):  # forward, recomputation, backward
        assert torch.equal(projection.dense_weight(weight.data, state, torch.bfloat16), expected)
    assert len(calls) == (1 if nested else 0)
    assert projection.absmax_cache_bytes(96 * 64, state) == (96 * 64 // state.blocksize * 4 if nested else 0)
    if nested:  # new stored scales (a re-quantised or moved state): dequantised again, from the new ones
        state.absmax = state.absmax.clone()
        assert torch.equal(projection.dense_weight(weight.data, state, torch.bfloat16), expected)
        assert len(calls) == 2
        with torch.inference_mode():  # not kept: an inference tensor could not meet autograd later
            state.absmax = state.absmax.clone()
            for _ in range(2):
                assert torch.equal(projection.dense_weight(weight.data, state, torch.bfloat16), expected)
        assert len(calls) == 4
        assert torch.equal(projection.dense_weight(weight.data, state, torch.bfloat16), expected)  # scales are
        assert len(calls) == 5  # an inference tensor now: no version to watch, not kept either
        state.absmax = state.absmax.clone()  # an ordinary tensor again: kept
        for _ in range(2):
            assert torch.equal(projection.dense_weight(weight.data, state, torch.bfloat16), expected)
        assert len(calls) == 6


def test_a_4bit_base_in_fp32_gives_peft_losses_and_gradients():
    model = _qlora_model(compute_dtype=torch.float32, dtype=torch.float32)
    ids = _ids(model)
    loss, grads = _step(model, ids)
    assert lora_fusion.fuse(model, Edits())["fused"] == 14
    fused_loss, fused_grads = _step(model, ids)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_4bit_mlp_runs_chunked_under_mlp_recompute_as_peft_computes_it():
    from unsloth_patch import mlp_recompute
    from unsloth_patch.kernels.chunked_mlp import chunked_gated_mlp

    model = _qlora_model(compute_dtype=torch.float32, dtype=torch.float32)
    mlp = model.base_model.model.model.layers[0].mlp
    parts = [mlp_recompute.projection_of(getattr(mlp, n))[0] for n in ("gate_proj", "up_proj", "down_proj")]
    assert all(p is not None and p.quant_state is not None for p in parts)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    leaves = [x] + [t for p in parts for t in (p.lora_a, p.lora_b)]
    expected = mlp(x)  # PEFT's 4-bit layers, bitsandbytes' matmul
    got = chunked_gated_mlp(x, *parts, activation="silu", dtype=torch.float32, chunk=5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_4bit_base_computing_in_another_dtype_is_left_to_peft():
    model = _qlora_model(compute_dtype=torch.float16)
    outcome = lora_fusion.fuse(model, Edits())
    assert outcome["fused"] == 0 and len(outcome["kept"]) == 14
    assert all("computes in torch.float16" in why for why in outcome["kept"].values())


def test_a_4bit_layer_with_dropout_draws_peft_masks():
    model = _qlora_model(compute_dtype=torch.float32, dtype=torch.float32)
    for module in model.modules():
        if lora_fusion.is_lora_4bit(module):
            module.lora_dropout["default"] = torch.nn.Dropout(0.3)
    model.train()
    ids = _ids(model)
    loss, grads = _step(model, ids, seed=3)
    assert lora_fusion.fuse(model, Edits())["fused"] == 14
    fused_loss, fused_grads = _step(model, ids, seed=3)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_the_trainer_replicates_with_data_parallel_keeps_every_forward(tokenizer, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from unsloth_patch import layers
    from unsloth_patch.patches.training_edits import replicated_reason
    from unsloth_patch.tiny import chat_dataset

    assert "nn.DataParallel" in replicated_reason(SimpleNamespace(args=SimpleNamespace(n_gpu=2)))
    assert replicated_reason(SimpleNamespace(args=SimpleNamespace(n_gpu=1))) is None
    assert replicated_reason(SimpleNamespace(args=SimpleNamespace(n_gpu=0))) is None  # CPU
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))  # one process, two GPUs: DataParallel
    dataset = chat_dataset(tokenizer, limit=8, format="text")
    model = build_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, seed=0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    try:
        trainer = sft_trainer(model, tokenizer, dataset, sft_config(tmp_path, max_length=32, max_steps=2, bf16=False),
                              peft_config=config)
    except ValueError as exc:  # newer TRL refuses nn.DataParallel itself
        assert "DataParallel" in str(exc)
        return
    trainer.train()  # older TRL: the Trainer wraps the model in nn.DataParallel (a pass-through on a CPU)
    assert lora_fusion.last()["fused"] == 0 and "nn.DataParallel" in lora_fusion.last()["reason"]
    assert "nn.DataParallel" in layers.last_fusion()["reason"]
    assert len(losses(trainer)) == 2
