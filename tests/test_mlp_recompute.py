"""The ``mlp_recompute`` policy: a gated MLP that keeps only its input, and a layer recomputation that stops before it.

The chunked MLP against autograd through the same maths (fp32, every chunk size, LoRA and trained base
weights), which projections and layers are eligible and why the others are not, and, through
``Trainer.train`` on a tiny Llama whose layers are fused on this CPU (kernels replaced by their PyTorch
references), the probe choosing it, the same losses as full checkpointing, and less memory.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import torch.nn.functional as F  # noqa: E402

import unsloth_patch  # noqa: E402  (activates the patches before TRL/transformers load)
from unsloth_patch import checkpointing as policy  # noqa: E402
from unsloth_patch import layers, mlp_recompute  # noqa: E402
from unsloth_patch.checkpointing import meter, mlp_chunk  # noqa: E402
from unsloth_patch.edits import Edits  # noqa: E402
from unsloth_patch.kernels import chunked_mlp, swiglu  # noqa: E402
from unsloth_patch.kernels.chunked_mlp import Projection, chunked_gated_mlp  # noqa: E402
from unsloth_patch.patches import checkpointing as wiring  # noqa: E402
from unsloth_patch.settings import Settings  # noqa: E402
from unsloth_patch.tiny import available_families, build_model  # noqa: E402

from .helpers import fusion_on_this_cpu, losses, sft_config, sft_trainer, text_dataset, use_settings  # noqa: E402,F401

unsloth_patch.apply()
HIDDEN, INTERMEDIATE, RANK = 24, 40, 4


def _projection(out_features, in_features, lora, trained, seed):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=g) * 0.2).requires_grad_(trained)
    if not lora:
        return Projection(weight)
    a = (torch.randn(RANK, in_features, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(out_features, RANK, generator=g) * 0.3).requires_grad_()
    return Projection(weight, a, b, 0.7)


def _reference(x, gate, up, down, activation):
    def project(t, p):
        y = F.linear(t, p.weight)
        return y if p.lora_a is None else y + F.linear(F.linear(t, p.lora_a), p.lora_b) * p.scaling

    g = project(x, gate)
    act = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")
    return project(act * project(x, up), down)


@pytest.mark.parametrize("lora, trained", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_chunked_mlp_matches_autograd_for_every_chunk_size(lora, trained, activation):
    gate = _projection(INTERMEDIATE, HIDDEN, lora, trained, 1)
    up = _projection(INTERMEDIATE, HIDDEN, lora, trained, 2)
    down = _projection(HIDDEN, INTERMEDIATE, lora, trained, 3)
    x = torch.randn(2, 13, HIDDEN, generator=torch.Generator().manual_seed(4)).requires_grad_()
    wanted = [x] + [t for p in (gate, up, down) for t in p[:3] if t is not None and t.requires_grad]
    expected = _reference(x, gate, up, down, activation)
    dy = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5))
    expected_grads = torch.autograd.grad(expected, wanted, dy)
    for chunk in (1, 5, 26, 1000):  # one token, uneven chunks, exactly one chunk, more than the tokens
        out = chunked_gated_mlp(x, gate, up, down, activation, chunk=chunk)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for got, want in zip(torch.autograd.grad(out, wanted, dy), expected_grads):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_chunked_mlp_keeps_only_its_input_for_the_backward():
    gate, up = (_projection(INTERMEDIATE, HIDDEN, True, False, s) for s in (1, 2))
    down = _projection(HIDDEN, INTERMEDIATE, True, False, 3)
    x = torch.randn(50, HIDDEN).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = chunked_gated_mlp(x, gate, up, down, chunk=8)
    assert len(saved) == 1 and saved[0] is x  # no [tokens, intermediate] tensor outlives the forward
    out.sum().backward()
    assert gate.lora_a.grad is not None and gate.weight.grad is None  # the frozen base gets none


def test_skip_returns_the_shape_at_once_and_saves_the_same():
    gate, up = (_projection(INTERMEDIATE, HIDDEN, False, True, s) for s in (1, 2))
    down = _projection(HIDDEN, INTERMEDIATE, False, True, 3)
    x = torch.randn(3, 7, HIDDEN).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = chunked_gated_mlp(x, gate, up, down, skip=True)
    assert out.shape == (3, 7, HIDDEN) and out.requires_grad and saved == [x]


def test_chunked_mlp_half_precision_sums_chunks_in_float32():
    gate, up = (_projection(INTERMEDIATE, HIDDEN, True, True, s) for s in (1, 2))
    down = _projection(HIDDEN, INTERMEDIATE, True, True, 3)
    x = torch.randn(40, HIDDEN, dtype=torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_gated_mlp(x, gate, up, down, dtype=torch.bfloat16, chunk=8)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert gate.weight.grad.dtype == torch.float32 and gate.lora_a.grad.dtype == torch.float32  # as the parameters


@pytest.mark.newest_only  # version-independent (torch only): once, in the session with the newest pins
def test_chunked_mlp_under_torch_compile():
    gate, up = (_projection(INTERMEDIATE, HIDDEN, True, True, s) for s in (1, 2))
    down = _projection(HIDDEN, INTERMEDIATE, True, True, 3)
    x = torch.randn(11, HIDDEN).requires_grad_()
    wanted = [x, gate.weight, gate.lora_a, down.lora_b]

    def loss(t):
        return chunked_gated_mlp(t.sin(), gate, up, down, chunk=4).square().sum()

    expected = torch.autograd.grad(loss(x), wanted)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager")(x), wanted)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.kernels
@pytest.mark.parametrize("gelu", [False, True])
def test_gated_kernel_forward_and_backward_in_place(gelu):
    """The Triton launches the chunked MLP uses (under TRITON_INTERPRET=1 on a CPU): the product, and the
    gradients written over gate and up, against the PyTorch references."""
    pytest.importorskip("triton")
    from unsloth_patch.kernels import swiglu

    if not swiglu.is_supported(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32):
        pytest.skip("the Triton kernels run neither on a GPU nor in the interpreter here")
    g = torch.Generator().manual_seed(8)
    gate, up, dy = (torch.randn(37, 70, generator=g) * 3 for _ in range(3))
    torch.testing.assert_close(swiglu.gated_forward_plain(gate, up, gelu), swiglu._forward_reference(gate, up, gelu))
    expected = swiglu._backward_reference(dy, gate, up, gelu)
    gate_buffer, up_buffer = gate.clone(), up.clone()
    dgate, dup = swiglu.gated_backward_into(dy, gate_buffer, up_buffer, gelu)
    assert dgate.data_ptr() == gate_buffer.data_ptr() and dup.data_ptr() == up_buffer.data_ptr()
    torch.testing.assert_close(dgate, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dup, expected[1], rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named():
    p = _projection(INTERMEDIATE, HIDDEN, False, False, 1)
    d = _projection(HIDDEN, INTERMEDIATE, False, False, 2)
    x = torch.randn(4, HIDDEN)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        chunked_gated_mlp(x, p, p, d, "relu")
    with pytest.raises(ValueError, match="chunk must be a positive number of tokens, got 0"):
        chunked_gated_mlp(x, p, p, d, chunk=0)
    with pytest.raises(ValueError, match="gate: lora_a and lora_b come together"):
        chunked_gated_mlp(x, Projection(p.weight, p.weight[:2]), p, d)


def test_zero_tokens():
    p, d = _projection(INTERMEDIATE, HIDDEN, True, True, 1), _projection(HIDDEN, INTERMEDIATE, True, True, 2)
    x = torch.randn(0, HIDDEN).requires_grad_()
    out = chunked_gated_mlp(x, p, p, d)
    assert out.shape == (0, HIDDEN)
    out.sum().backward()
    assert x.grad.shape == (0, HIDDEN)


# --------------------------------------------------------------------------- which MLPs and layers


def test_layers_whose_mlp_output_only_meets_an_addition():
    families = {"llama": True, "mistral": True, "qwen2": True, "qwen3": True, "gemma": True, "gemma2": False}
    for family, expected in families.items():
        if family not in available_families():
            continue
        layer = build_model(family, vocab_size=64, num_layers=1).model.layers[0]
        assert mlp_recompute.mlp_is_last(type(layer)) is expected, family  # gemma2: a norm after its MLP


def test_plain_linear_projections():
    assert mlp_recompute.projection_of(torch.nn.Linear(4, 3, bias=False))[0].lora_a is None
    assert mlp_recompute.projection_of(torch.nn.Linear(4, 3))[1] == "has a bias"
    hooked = torch.nn.Linear(4, 3, bias=False)
    hooked.register_forward_hook(lambda *a: None)
    assert mlp_recompute.projection_of(hooked)[1] == "has forward hooks"
    assert "is not a plain nn.Linear" in mlp_recompute.projection_of(torch.nn.Conv1d(4, 3, 1))[1]


def _lora_mlp(**config):
    peft = pytest.importorskip("peft")
    model = build_model("llama", vocab_size=64, num_layers=1)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                         **config))
    return wrapped, wrapped.get_base_model().model.layers[0].mlp


def test_peft_lora_projections_and_why_others_are_left_to_peft():
    _, mlp = _lora_mlp(lora_dropout=0.0, lora_alpha=4)
    projection, why = mlp_recompute.projection_of(mlp.gate_proj)
    assert why is None and projection.scaling == 2.0 and projection.lora_a is mlp.gate_proj.lora_A["default"].weight
    assert mlp_recompute.projection_of(_lora_mlp(lora_dropout=0.1)[1].up_proj)[1] == "lora_dropout > 0"
    assert "DoRA" in mlp_recompute.projection_of(_lora_mlp(lora_dropout=0.0, use_dora=True)[1].up_proj)[1]
    wrapped, mlp = _lora_mlp(lora_dropout=0.0)
    with wrapped.disable_adapter():
        assert mlp_recompute.projection_of(mlp.down_proj)[1] == "adapters disabled or merged"


class _WideBytes(meter.LiveBytes):
    """The probe's CPU meter, counting only storages of at least ``floor`` bytes: the intermediate-wide ones."""

    def __init__(self, floor):
        super().__init__()
        self.floor = floor

    def track(self, tensor) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() >= self.floor:
            super().track(tensor)


@pytest.mark.parametrize("lora", [False, True])
def test_a_chunk_holds_three_intermediate_wide_tensors_a_token(lora, monkeypatch):
    """The memory model's ``bytes_per_token``: three, adapters or not, in the forward and in the backward."""
    # the activation's PyTorch reference: Triton's CPU interpreter copies its arguments, a GPU launch does not
    monkeypatch.setattr(swiglu, "is_supported", lambda device, dtype: False)
    tokens, chunk, width = 1024, 512, 1024  # the activation's CPU reference works on blocks of 1/8 of a tensor
    gate, up = (_projection(width, HIDDEN, lora, not lora, seed) for seed in (1, 2))
    down = _projection(HIDDEN, width, lora, not lora, 3)
    x = torch.randn(tokens, HIDDEN, requires_grad=True)
    one_wide = chunk * width * 4  # one chunk's intermediate-wide fp32 tensor; weights and x are far smaller
    with _WideBytes(one_wide // 2).measuring() as forward:
        out = chunked_gated_mlp(x, gate, up, down, chunk=chunk)
    with _WideBytes(one_wide // 2).measuring() as backward:
        out.backward(torch.randn_like(out))
    assert forward.peak == mlp_recompute.TENSORS_PER_TOKEN * one_wide, forward.peak / one_wide
    assert backward.peak == mlp_recompute.TENSORS_PER_TOKEN * one_wide, backward.peak / one_wide


def test_a_chunk_token_is_sized_from_the_widest_marked_mlp():
    wrapped, mlp = _lora_mlp(lora_dropout=0.0, lora_alpha=4)
    edits = Edits()
    edits.setattr(mlp, "_unsloth_activation", "silu")
    edits.setattr(mlp, mlp_recompute.MARK, True)
    assert mlp_recompute.bytes_per_token(wrapped, 2) == 3 * mlp.gate_proj.out_features * 2
    edits.rollback()
    assert mlp_recompute.bytes_per_token(wrapped, 2) == 0  # nothing marked


def test_the_chunked_path_runs_only_inside_a_layer_call():
    model = build_model("llama", vocab_size=64, num_layers=1)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 5, 64)
    edits = Edits()
    edits.setattr(mlp, "_unsloth_activation", "silu")
    edits.setattr(mlp, mlp_recompute.MARK, True)
    assert mlp_recompute.phase() is None and mlp_recompute.forward(mlp, x) is None
    with mlp_recompute.layer_call(recomputing=False):
        assert mlp_recompute.phase() == "forward"
        torch.testing.assert_close(mlp_recompute.forward(mlp, x), type(mlp).forward(mlp, x), rtol=1e-5, atol=1e-6)
        with mlp_recompute.layer_call(recomputing=True):
            assert mlp_recompute.phase() == "recompute"
        assert mlp_recompute.phase() == "forward"
    edits.rollback()
    assert mlp_recompute.forward(mlp, x) is None and not hasattr(mlp, mlp_recompute.MARK)


# --------------------------------------------------------------------------- through Trainer.train


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=16)


@pytest.fixture
def fused_on_this_cpu(monkeypatch, use_settings, fusion_on_this_cpu):
    """The trainer fuses the tiny model's layers on the CPU, with the kernels' PyTorch references."""
    from unsloth_patch.kernels import rmsnorm, swiglu

    monkeypatch.setattr(rmsnorm, "rms_norm", rmsnorm.rms_norm_reference)
    monkeypatch.setattr(swiglu, "gated_activation", _autograd_gated)
    monkeypatch.setattr(chunked_mlp, "CHUNK_TOKENS", 64)  # a batch of four 64-token rows: four chunks
    use_settings(kernels_off=("rope",))


def _autograd_gated(gate, up, kind):
    return (F.silu(gate) if kind == "silu" else F.gelu(gate, approximate="tanh")) * up


def _config(tmp_path, **overrides):
    values = dict(max_length=64, per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3, bf16=False,
                  logging_steps=1)
    values.update(overrides)
    config = sft_config(tmp_path, **values)
    for name in wiring.FLAG_FIELDS:  # on only as TRL's default would set it
        if hasattr(config, name):
            object.__setattr__(config, name, True)
    return config


def _trainer(tokenizer, dataset, tmp_path, peft_config=None, **overrides):
    model = build_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=2048, seed=0)
    kwargs = {"peft_config": peft_config} if peft_config is not None else {}
    return sft_trainer(model, tokenizer, dataset, _config(tmp_path, **overrides), **kwargs)


@pytest.mark.parametrize("adapter", [False, True])
def test_probe_chooses_it_and_training_matches_full_checkpointing(adapter, tokenizer, dataset, tmp_path,
                                                                  fused_on_this_cpu, use_settings, monkeypatch):
    kind, reason = layers._mlp_activation(build_model("llama", vocab_size=64, num_layers=1).model.layers[0].mlp)
    if kind is None:  # transformers 4.46's LlamaMLP.forward carries a pretraining_tp branch: never fused there
        assert "forward is not" in reason, reason
        pytest.skip(f"no fused MLP on this transformers ({reason})")
    peft = pytest.importorskip("peft") if adapter else None
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                             task_type="CAUSAL_LM") if adapter else None
    full = _trainer(tokenizer, dataset, tmp_path / "full", config)
    forced = policy.Decision("full", "forced for the reference run", probed=True)
    with monkeypatch.context() as m:
        m.setattr(wiring, "decide", lambda trainer, settings: forced)
        full.train()
    reference = losses(full)

    trainer = _trainer(tokenizer, dataset, tmp_path / "ours", config)
    spec, extra = wiring.probe_spec(trainer), wiring.extra_bytes(trainer)
    loss_fn = wiring.trainer_loss(trainer)
    layers.fuse_model_layers(trainer.model, edits=Edits())  # fused as train() will fuse them, to measure
    assert mlp_recompute.available(trainer.model) == (2, "")  # both layers' MLPs, LoRA or not
    recomputing = {}  # the most a layer's recomputation and backward held, in one step of the batch
    for name in ("mlp_recompute", "full"):
        step = policy.measure(trainer.model, spec, name, {}, None, None, loss_fn=loss_fn, phases=True)
        recomputing[name] = max(peak for (peak, _), kind in zip(step.phases, step.kinds) if kind == "recompute")
    # the recomputed layer's MLP intermediates (256 tokens x 2048 x 4 bytes each): a quarter of four held at once
    assert recomputing["full"] - recomputing["mlp_recompute"] > 2 * 256 * 2048 * 4, recomputing
    predicted = {name: policy.predicted_peak(trainer.model, spec, name, {}, None, None, loss_fn=loss_fn)
                 for name in ("none", "selective", "mlp_recompute")}
    faster = min(predicted["none"], predicted["selective"])  # the candidates probed before it hold more
    assert faster > predicted["mlp_recompute"], predicted
    use_settings(memory_budget_gb=((faster + predicted["mlp_recompute"]) / 2 + extra) / policy.GIB)
    chunks = []
    real = chunked_mlp.chunked_gated_mlp
    monkeypatch.setattr(chunked_mlp, "chunked_gated_mlp", lambda *a, **k: chunks.append(k["chunk"]) or real(*a, **k))
    trainer.train()
    decision = policy.last_decision()
    assert decision.policy == "mlp_recompute", decision.summary()
    # the chunk is sized from the room left under the budget (here too little to grow) and is what the probe's
    # steps and the worst batch use; a smaller batch may run larger chunks (per-batch choices), never smaller
    chosen = decision.mlp_chunk
    assert chosen.probed == 64 and chosen.bytes_per_token == 3 * 2048 * 4, chosen
    assert chosen.reason in decision.summary()
    assert min(chunks) == chosen.tokens and len(chunks) >= 2 * 2 * 4, chunks  # the probe's steps, then the 4 steps'
    got = losses(trainer)
    assert len(got) == len(reference) == 4
    for a, b in zip(reference, got):
        assert abs(a - b) <= 1e-4 * abs(a), (reference, got)


def test_offload_recomputes_the_mlps_the_same_way(tokenizer, dataset, tmp_path, fused_on_this_cpu, monkeypatch):
    """``offload`` (its host copies are CUDA-only) keeps only the MLPs' inputs too: same losses as full."""
    if layers._mlp_activation(build_model("llama", vocab_size=64, num_layers=1).model.layers[0].mlp)[0] is None:
        pytest.skip("no fused MLP on this transformers (LlamaMLP.forward with a pretraining_tp branch)")
    runs, calls = {}, []
    real = chunked_mlp.chunked_gated_mlp
    monkeypatch.setattr(chunked_mlp, "chunked_gated_mlp", lambda *a, **k: calls.append(k["skip"]) or real(*a, **k))
    for name in ("full", "offload"):
        trainer = _trainer(tokenizer, dataset, tmp_path / name)
        forced = policy.Decision(name, "forced", probed=True)
        with monkeypatch.context() as m:
            m.setattr(wiring, "decide", lambda trainer, settings: forced)
            trainer.train()
        runs[name] = losses(trainer)
    assert calls.count(False) == calls.count(True) == 2 * 4  # 2 layers x 4 steps, forward and recomputation
    for a, b in zip(runs["full"], runs["offload"]):
        assert abs(a - b) <= 1e-4 * abs(a), runs


def test_a_larger_chunk_is_used_by_the_run_and_trains_the_same(tokenizer, dataset, tmp_path, fused_on_this_cpu,
                                                                 monkeypatch):
    if layers._mlp_activation(build_model("llama", vocab_size=64, num_layers=1).model.layers[0].mlp)[0] is None:
        pytest.skip("no fused MLP on this transformers (LlamaMLP.forward with a pretraining_tp branch)")
    runs, chunks = {}, []
    real = chunked_mlp.chunked_gated_mlp
    monkeypatch.setattr(chunked_mlp, "chunked_gated_mlp", lambda *a, **k: chunks.append(k["chunk"]) or real(*a, **k))
    larger = mlp_chunk.Chunk(256, (256 - 64) * 3 * 2048 * 4, "room under the budget", 64, 3 * 2048 * 4)
    for name, chunk in (("probed", None), ("larger", larger)):
        trainer = _trainer(tokenizer, dataset, tmp_path / name)
        forced = policy.Decision("mlp_recompute", "forced", probed=True, mlp_chunk=chunk)
        with monkeypatch.context() as m:
            m.setattr(wiring, "decide", lambda trainer, settings: forced)
            trainer.train()
        runs[name] = losses(trainer)
        assert not any(hasattr(m, mlp_recompute.CHUNK) for m in trainer.model.modules())  # put back after train()
    assert chunks == [64] * 16 + [256] * 16  # 2 layers x forward and recomputation x 4 steps, each run
    for a, b in zip(runs["probed"], runs["larger"]):
        assert abs(a - b) <= 1e-4 * abs(a), runs


def test_turned_off_by_name(tokenizer, dataset, tmp_path, fused_on_this_cpu, use_settings):
    use_settings(kernels_off=("rope", "mlp_recompute"), memory_budget_gb=64.0)
    trainer = _trainer(tokenizer, dataset, tmp_path, max_steps=1)
    decision = wiring._decide_locally(trainer, Settings(kernels_off=("rope", "mlp_recompute"), memory_budget_gb=64.0))
    assert decision.rejected["mlp_recompute"] == "turned off by UNSLOTH_PATCH_KERNELS_OFF=mlp_recompute"


MIB = 1 << 20
PER_TOKEN = 3 * 5632 * 2  # the 1.1B Llama's three intermediate-wide bf16 tensors per token


def test_chunks_grow_into_half_the_room_left_under_the_budget():
    chunk = mlp_chunk.choose("mlp_recompute", budget=2048 * MIB, peak=1600 * MIB, extra=48 * MIB,
                             bytes_per_token=PER_TOKEN, batch_tokens=16384, probed=2048)
    assert chunk.changed and chunk.tokens % mlp_chunk.ROUND == 0
    half_room = 200 * MIB
    assert chunk.extra_bytes == (chunk.tokens - 2048) * PER_TOKEN <= half_room
    assert half_room - chunk.extra_bytes < mlp_chunk.ROUND * PER_TOKEN  # no whole step of 256 tokens left over
    assert chunk.extra_at(1000) == 0  # a batch within one probed chunk holds the same
    assert chunk.extra_at(5000) == (5000 - 2048) * PER_TOKEN
    assert chunk.extra_at(10 ** 6) == chunk.extra_bytes  # never more than at the worst batch
    assert f"{chunk.tokens}-token MLP chunks" in chunk.reason and "probed 2048-token" in chunk.reason


def test_chunks_never_exceed_the_largest_batch_nor_a_budget_without_room():
    whole = mlp_chunk.choose("offload", 8192 * MIB, 1000 * MIB, 0, PER_TOKEN, batch_tokens=3000, probed=2048)
    assert whole.tokens == 3000 and "(the whole batch)" in whole.reason
    assert whole.extra_bytes == (3000 - 2048) * PER_TOKEN
    full = mlp_chunk.choose("mlp_recompute", 2000 * MIB, 1990 * MIB, 20 * MIB, PER_TOKEN, 16384, 2048)
    assert (full.tokens, full.extra_bytes, full.changed) == (2048, 0, False) and "too little" in full.reason
    small = mlp_chunk.choose("mlp_recompute", 8192 * MIB, 1000 * MIB, 0, PER_TOKEN, batch_tokens=1500, probed=2048)
    assert small.tokens == 2048 and "no batch exceeds one chunk" in small.reason
    unknown = mlp_chunk.choose("mlp_recompute", 8192 * MIB, 1000 * MIB, 0, 0, 16384, 2048)
    assert unknown.tokens == 2048 and "not known" in unknown.reason
    for name in ("none", "selective", "full"):  # their MLPs do not run chunked
        assert mlp_chunk.choose(name, 8192 * MIB, 1000 * MIB, 0, PER_TOKEN, 16384, 2048) is None
    with pytest.raises(ValueError, match="positive chunk size"):
        mlp_chunk.choose("mlp_recompute", 8192 * MIB, 1000 * MIB, 0, PER_TOKEN, 16384, probed=0)


def test_chunk_sizing_turned_off_by_name_keeps_the_probed_chunk():
    from types import SimpleNamespace

    model = build_model("llama", vocab_size=64, num_layers=1, intermediate_size=96)
    edits = Edits()
    edits.setattr(model.model.layers[0].mlp, "_unsloth_activation", "silu")
    edits.setattr(model.model.layers[0].mlp, mlp_recompute.MARK, True)
    spec = SimpleNamespace(lengths=[4096, 4096], flat=True)
    on = wiring._chunk(model, spec, "mlp_recompute", 1000 * MIB, 8192 * MIB, 0, "bf16", Settings())
    assert on.changed and on.bytes_per_token == 3 * 96 * 2 and on.tokens == 8192  # room for the whole batch
    off = wiring._chunk(model, spec, "mlp_recompute", 1000 * MIB, 8192 * MIB, 0, "bf16",
                        Settings(kernels_off=("mlp_chunk",)))
    assert not off.changed and off.reason.endswith("turned off by UNSLOTH_PATCH_KERNELS_OFF=mlp_chunk")
    assert wiring._chunk(model, spec, "selective", 1000 * MIB, 8192 * MIB, 0, "bf16", Settings()) is None
    padded = SimpleNamespace(lengths=[4096, 100], flat=False)  # a padded batch: every row as long as the longest
    assert wiring._chunk(model, padded, "offload", 1000 * MIB, 8192 * MIB, 0, "bf16", Settings()).tokens == 8192
    edits.rollback()


def test_a_run_sets_the_chunk_of_each_marked_mlp_and_puts_it_back():
    model = build_model("llama", vocab_size=64, num_layers=2, intermediate_size=96)
    edits = Edits()
    for layer in model.model.layers:
        edits.setattr(layer.mlp, "_unsloth_activation", "silu")
    assert mlp_recompute.bytes_per_token(model, 2) == 0  # nothing marked
    edits.setattr(model.model.layers[1].mlp, mlp_recompute.MARK, True)
    assert mlp_recompute.bytes_per_token(model, 2) == 3 * 96 * 2
    assert mlp_recompute.default_chunk() == chunked_mlp.CHUNK_TOKENS
    run = Edits()
    assert mlp_recompute.set_chunk(model, 5, run) == 1
    mlp, x = model.model.layers[1].mlp, torch.randn(2, 7, 64)
    with mlp_recompute.layer_call(recomputing=False):
        torch.testing.assert_close(mlp_recompute.forward(mlp, x), type(mlp).forward(mlp, x), rtol=1e-5, atol=1e-6)
    assert getattr(mlp, mlp_recompute.CHUNK) == 5
    run.rollback()
    assert not hasattr(mlp, mlp_recompute.CHUNK)
    edits.rollback()


def test_the_prediction_for_the_batches_seen_counts_the_larger_chunks(monkeypatch):
    from unsloth_patch.patches import seen_batches

    chunk = mlp_chunk.choose("mlp_recompute", 2048 * MIB, 1600 * MIB, 48 * MIB, PER_TOKEN, 16384, 2048)
    decision = policy.Decision("mlp_recompute", "test", probed=True, extra_bytes=48 * MIB, longest=2048,
                               chosen_steps=["measured steps"], mlp_chunk=chunk)
    monkeypatch.setattr(policy, "peak_at", lambda steps, sequences: 1000 * MIB)
    largest = seen_batches._Largest()
    largest.tokens = 5000
    seen_batches.settle(decision, largest)
    assert decision.predicted_seen_bytes == 1000 * MIB + 48 * MIB + (5000 - 2048) * PER_TOKEN


def test_chunk_default_bounds_what_one_chunk_holds():
    # three intermediate tensors of one chunk, bf16, for the 1.1B Llama's 8192: 96 MiB
    assert mlp_recompute.TENSORS_PER_TOKEN * chunked_mlp.CHUNK_TOKENS * 8192 * 2 == 96 << 20


# --------------------------------------------------------------------------- offload's host side


class _Event:
    def __init__(self, done):
        self.done = done

    def query(self):
        return self.done


def test_pinned_pool_reuses_a_buffer_once_the_copy_that_read_it_finished():
    from unsloth_patch.checkpointing import offload

    class Pool(offload._PinnedPool):
        @staticmethod
        def _allocate(size):
            return torch.empty(size, dtype=torch.uint8)

    pool = Pool()
    first = pool.take(3 << 20)
    assert first.numel() == 4 << 20 and Pool.bucket(5 << 20) == 8 << 20 and Pool.bucket(1) == 1 << 20
    copy = _Event(done=False)
    pool.give([first, copy])
    second = pool.take(3 << 20)  # the host-to-device copy still reads the first: a new buffer
    assert second.data_ptr() != first.data_ptr() and pool.allocated == 8 << 20
    copy.done = True
    assert pool.take(4 << 20).data_ptr() == first.data_ptr()  # same bucket, copy done: reused
    assert pool.take(9 << 20).numel() == 16 << 20 and pool.allocated == 24 << 20


def test_pinned_pool_falls_back_to_pageable_memory_when_pinning_fails(caplog, monkeypatch):
    from unsloth_patch import log
    from unsloth_patch.checkpointing import offload

    monkeypatch.setattr(log, "_said", set())  # the warning is said once a process: this test's process here

    attempts = []

    class Pool(offload._PinnedPool):
        @staticmethod
        def _allocate(size):
            attempts.append(size)
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)\nmore")

    pool = Pool()
    with caplog.at_level("WARNING", logger="unsloth_patch"):
        first = pool.take(3 << 20)
        second = pool.take(5 << 20)
    assert first.numel() == 4 << 20 and second.numel() == 8 << 20 and not first.is_pinned()
    assert attempts == [4 << 20], "pinning is not tried again once it failed"
    assert pool.pageable.startswith("RuntimeError: CUDA error: out of memory") and pool.allocated == 12 << 20
    assert sum("could not be pinned" in r.getMessage() for r in caplog.records) == 1
    data = torch.randn(3 << 18)  # a saved input's bytes round-trip through the pageable buffer unchanged
    host = first[:data.numel() * 4].view(torch.float32)
    host.copy_(data)
    assert torch.equal(host.clone(), data)


def test_offloaded_inputs_fetch_the_nearest_unused_ones_ahead():
    import weakref

    from unsloth_patch.checkpointing import offload

    records, previous = [], None
    for i in range(6):  # the order the forward saves them in
        record = offload._Offloaded("cuda:0", None, None, previous, [None, None])
        records.append(record)
        previous = weakref.ref(record)
    last = records[-1]
    assert last.ahead(3) == [records[4], records[3], records[2]]
    records[4].used = True
    assert last.ahead(2) == [records[3], records[2]]
    del records[1:3]  # freed by autograd: the chain ends there
    assert last.ahead(5) == [records[1]]  # what was records[3]
