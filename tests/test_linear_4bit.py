"""The 4-bit matmul kernels (``kernels/linear_4bit.py``) and the choice of the path a 4-bit weight takes.

Contract: the weight a tile dequantises is bitsandbytes' own, bit for bit; the forward and the input
gradient are that weight's matmuls; a fused QLoRA layer trains as with bitsandbytes' dequantisation; the
path is chosen by a pure decision that gives each rejected option its reason. On the CPU the kernels run in
Triton's interpreter, in float32 and float16 (the interpreter rounds float32 to bfloat16 toward zero, so the
bfloat16 check is the GPU's: ``benchmarks/linear_4bit.py --check``).
"""

from __future__ import annotations

import pytest
import torch

from unsloth_patch.matmul_4bit_plan import BITSANDBYTES, FUSED, KEPT_DENSE, Facts, choose

pytestmark = pytest.mark.kernels

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("triton")

from bitsandbytes import functional  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

from unsloth_patch.kernels import linear_4bit, projection  # noqa: E402
from unsloth_patch.kernels.projection import _absmax  # noqa: E402

# (out, in): a square block-aligned one, one whose rows end mid-block (in % blocksize != 0), an odd row count
SHAPES = [(48, 128), (37, 96), (33, 160)]


def _packed(shape, quant_type, nested, blocksize, dtype, seed):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.2
    return functional.quantize_4bit(weight.to(dtype), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=nested)


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True], ids=["plain-scales", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_the_weight_a_tile_dequantises_is_bitsandbytes_bit_for_bit(shape, blocksize, nested, quant_type, dtype):
    packed, state = _packed(shape, quant_type, nested, blocksize, dtype, seed=sum(shape) + blocksize)
    ours = linear_4bit.dequantize_4bit(packed, _absmax(state), quant_type, blocksize, state.shape, dtype)
    # bitsandbytes' generic dequantisation: flat blocks over the row-major weight, as its CUDA kernel counts them
    generic = _dequantize_4bit_compute(packed.reshape(-1), _absmax(state), linear_4bit.code_table(quant_type, "cpu"),
                                       blocksize, state.shape, dtype)
    assert ours.shape == generic.shape == shape and ours.dtype == dtype
    assert torch.equal(_bits(ours), _bits(generic))
    if shape[1] % blocksize == 0:  # its CPU kernel counts blocks per row; the same blocks when rows hold whole ones
        assert torch.equal(_bits(ours), _bits(functional.dequantize_4bit(packed, state)))
    assert ours.abs().max() > 0 and ours.unique().numel() > 16  # scales differ between blocks


# interpreter tiles wider than a 64-value block: a tile spans whole blocks (GROUP_SCALES where rows hold whole ones)
WIDE_TILES = {"linear": (16, 16, 128, 1, 1), "linear_dx": (16, 16, 128, 1, 1), "dequantize": (16, 128)}


def test_the_scale_layout_follows_how_tiles_meet_blocks():
    assert linear_4bit.scale_layout(2048, 64, 64) == linear_4bit.ROW_SCALE
    assert linear_4bit.scale_layout(2048, 64, 16) == linear_4bit.ROW_SCALE
    assert linear_4bit.scale_layout(2048, 64, 128) == linear_4bit.GROUP_SCALES
    assert linear_4bit.scale_layout(160, 64, 16) == linear_4bit.PER_VALUE  # rows end mid-block
    assert linear_4bit.scale_layout(192, 64, 96) == linear_4bit.PER_VALUE  # neither inside nor whole blocks


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_tiles_spanning_several_blocks_read_the_same_weight(shape, quant_type, monkeypatch):
    monkeypatch.setattr(linear_4bit, "INTERPRETER_TILES", WIDE_TILES)
    packed, state = _packed(shape, quant_type, True, 64, torch.float16, seed=9)
    generic = _dequantize_4bit_compute(packed.reshape(-1), _absmax(state), linear_4bit.code_table(quant_type, "cpu"),
                                       64, state.shape, torch.float16)
    assert torch.equal(_bits(linear_4bit.dequantize_4bit(packed, _absmax(state), quant_type, 64, state.shape,
                                                         torch.float16)), _bits(generic))
    x, dy = torch.randn(21, shape[1]), torch.randn(21, shape[0])  # fp32: the weight dequantised to fp32
    w = _dequantize_4bit_compute(packed.reshape(-1), _absmax(state), linear_4bit.code_table(quant_type, "cpu"), 64,
                                 state.shape, torch.float32).double()
    y = linear_4bit.linear_4bit(x, *_fp32(packed, state, quant_type))
    dx = linear_4bit.linear_4bit_dx(dy, *_fp32(packed, state, quant_type))
    assert ((y.double() - x.double() @ w.t()).norm() / (x.double() @ w.t()).norm()) < 1e-5
    assert ((dx.double() - dy.double() @ w).norm() / (dy.double() @ w).norm()) < 1e-5


def _fp32(packed, state, quant_type):
    return packed, _absmax(state), quant_type, 64, state.shape


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_forward_and_input_gradient_are_the_dequantised_weight_s_matmuls(shape, dtype, tolerance):
    out_features, in_features = shape
    packed, state = _packed(shape, "nf4", True, 64, dtype, seed=3)
    weight = functional.dequantize_4bit(packed, state) if in_features % 64 == 0 else _dequantize_4bit_compute(
        packed.reshape(-1), _absmax(state), linear_4bit.code_table("nf4", "cpu"), 64, state.shape, dtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 19, in_features, generator=g).to(dtype)  # 38 rows: not a multiple of any tile
    bias = torch.randn(out_features, generator=g).to(dtype)
    dy = torch.randn(38, out_features, generator=g).to(dtype)
    addend = torch.randn(38, in_features, generator=g).to(dtype)
    w64 = weight.double()

    def close(got, want):
        assert got.dtype == dtype
        assert ((got.double() - want).norm() / want.norm()).item() < tolerance

    y = linear_4bit.linear_4bit(x, packed, _absmax(state), "nf4", 64, state.shape)
    assert y.shape == (2, 19, out_features)
    close(y.reshape(38, -1), x.reshape(38, -1).double() @ w64.t())
    close(linear_4bit.linear_4bit(x, packed, _absmax(state), "nf4", 64, state.shape, bias).reshape(38, -1),
          x.reshape(38, -1).double() @ w64.t() + bias.double())
    close(linear_4bit.linear_4bit_dx(dy, packed, _absmax(state), "nf4", 64, state.shape), dy.double() @ w64)
    close(linear_4bit.linear_4bit_dx(dy, packed, _absmax(state), "nf4", 64, state.shape, addend),
          dy.double() @ w64 + addend.double())


def test_what_the_kernels_cannot_take_is_named(monkeypatch):
    packed, state = _packed((48, 128), "nf4", True, 64, torch.float16, seed=1)
    absmax = _absmax(state)
    reason = linear_4bit.not_taken_reason
    assert reason(packed, absmax, "nf4", 64, state.shape, torch.float16) is None
    assert "quantisation 'int8'" in reason(packed, absmax, "int8", 64, state.shape, torch.float16)
    assert "float32, one a block" in reason(packed, state.absmax, "nf4", 64, state.shape, torch.float16)  # 8-bit
    assert "block size 48" in reason(packed, absmax, "nf4", 48, state.shape, torch.float16)
    assert "layout" in reason(packed[::2], absmax, "nf4", 64, state.shape, torch.float16)
    assert "compute dtype torch.int8" in reason(packed, absmax, "nf4", 64, state.shape, torch.int8)
    odd = torch.zeros(48 * 127 // 2 + 1, 1, dtype=torch.uint8)
    assert "127 input features" in reason(odd, absmax, "nf4", 64, torch.Size([48, 127]), torch.float16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "need a CUDA GPU" in reason(packed, absmax, "nf4", 64, state.shape, torch.float16)


# --------------------------------------------------------------------------- the choice, a pure decision


def test_a_weight_kept_dense_is_multiplied_dense_whatever_the_setting():
    for setting in (BITSANDBYTES, FUSED):
        choice = choose(Facts(setting=setting, kept_dense=True))
        assert choice.option == KEPT_DENSE and choice.rejected == {}


def test_the_fused_kernels_run_only_when_asked_for_and_able_each_refusal_with_its_reason():
    default = choose(Facts(setting=BITSANDBYTES, kept_dense=False, dense_reason="no room for the copies"))
    assert default.option == BITSANDBYTES
    assert default.rejected[KEPT_DENSE] == "no room for the copies"
    assert "UNSLOTH_PATCH_MATMUL_4BIT=fused" in default.rejected[FUSED]
    asked = choose(Facts(setting=FUSED, kept_dense=False))
    assert asked.option == FUSED and list(asked.rejected) == [KEPT_DENSE]
    unable = choose(Facts(setting=FUSED, kept_dense=False, kernel_reason="127 input features"))
    assert unable.option == BITSANDBYTES and "127 input features" in unable.rejected[FUSED]
    failed = choose(Facts(setting=FUSED, kept_dense=False, kernel_failed=True))
    assert failed.option == BITSANDBYTES and "failed earlier" in failed.rejected[FUSED]
    assert failed.describe().startswith("bitsandbytes (not kept dense: ")


def test_the_setting_is_read_and_a_wrong_value_names_the_accepted_ones():
    from unsloth_patch.settings import read_settings

    assert read_settings({}).matmul_4bit == "bitsandbytes"
    assert read_settings({"UNSLOTH_PATCH_MATMUL_4BIT": "Fused"}).matmul_4bit == "fused"
    with pytest.raises(ValueError, match="UNSLOTH_PATCH_MATMUL_4BIT='triton'.*bitsandbytes, fused"):
        read_settings({"UNSLOTH_PATCH_MATMUL_4BIT": "triton"})


# --------------------------------------------------------------------------- in the fused LoRA layers


@pytest.fixture
def fusing():
    projection.fusing_4bit(True)
    yield
    projection.fusing_4bit(False)


def _bitsandbytes_calls(monkeypatch):
    calls = []
    real = projection._dequantized
    monkeypatch.setattr(projection, "_dequantized", lambda *a: calls.append(1) or real(*a))
    return calls


def test_a_fused_qlora_model_trains_as_with_bitsandbytes_dequantising(monkeypatch):
    """fp32, five SGD steps of every adapter: per-step losses within 1e-5 relative, fused kernels in every layer.
    Every weight's rows hold whole 64-value blocks (intermediate size 128): bitsandbytes 0.50's CPU dequantisation
    kernel counts blocks per row, unlike its quantiser and its CUDA kernel, so on rows that end mid-block the
    reference itself would be off (``test_the_weight_a_tile_dequantises_is_bitsandbytes_bit_for_bit``)."""
    from unsloth_patch import lora_fusion
    from unsloth_patch.edits import Edits

    from .test_lora_fusion import _ids, _qlora_model, _step

    def run(fused):
        torch.manual_seed(0)  # PEFT draws lora_A from the global generator: the same adapters in both runs
        model = _qlora_model(compute_dtype=torch.float32, dtype=torch.float32, intermediate_size=128)
        assert lora_fusion.fuse(model, Edits())["fused"] == 14
        projection.fusing_4bit(fused)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trained, lr=0.5)
        calls = _bitsandbytes_calls(monkeypatch)
        losses, grads = [], None
        for step in range(5):
            loss, grads_now = _step(model, _ids(model, seed=step))
            losses.append(loss.item())
            grads = grads or grads_now
            optimizer.step()
        choices = projection.matmul_4bit_choices()
        projection.fusing_4bit(False)
        return losses, grads, calls, choices

    try:
        reference, reference_grads, reference_calls, _ = run(False)
        fused, fused_grads, fused_calls, choices = run(True)
    finally:
        projection.fusing_4bit(False)
    assert len(reference_calls) > 0 and fused_calls == []  # bitsandbytes never dequantised a weight
    assert choices == {"fused (not kept dense: the memory decision keeps no dense copies in this run)": 14}
    for got, want in zip(fused, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (fused, reference)
    assert fused[-1] < fused[0]  # it trained
    for name, grad in reference_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_kept_dense_weights_stay_on_cublas_when_fusing_is_asked_for(fusing, monkeypatch):
    packed, state = _packed((48, 128), "nf4", True, 64, torch.float32, seed=4)
    x = torch.randn(5, 128)
    projection.keeping_dense(True)
    try:
        calls = _bitsandbytes_calls(monkeypatch)
        dense = projection.base_product(x, packed, state, torch.float32)
        assert len(calls) == 1 and projection.kept_dense_count() == 1  # dequantised once, kept
        assert projection.matmul_4bit_choices() == {"kept dense": 1}
    finally:
        projection.keeping_dense(False)
    fused = projection.base_product(x, packed, state, torch.float32)  # no copy kept now: the kernels
    assert len(calls) == 1 and list(projection.matmul_4bit_choices()) == [
        "fused (not kept dense: the memory decision keeps no dense copies in this run)"]
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-6)


def test_the_setting_turns_the_kernels_on_for_one_train_with_a_warning_and_the_rollback_off(caplog):
    import dataclasses
    import logging

    from unsloth_patch import log
    from unsloth_patch.edits import Edits
    from unsloth_patch.patches import training_edits
    from unsloth_patch.settings import Settings

    from .helpers import plugin_log

    log.forget()
    with plugin_log(caplog, logging.WARNING):
        for value, expected in (("bitsandbytes", False), ("fused", True)):
            edits = Edits()
            training_edits._fuse_4bit_matmuls(dataclasses.replace(Settings(), matmul_4bit=value), edits)
            assert projection._FUSE_4BIT[0] is expected
            edits.rollback()
            assert projection._FUSE_4BIT[0] is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "15-32x slower" in warnings[0]  # said when asked for, not by default


def test_the_ops_pass_torch_library_s_checks_for_compile_and_fake_tensors():
    packed, state = _packed((48, 128), "nf4", True, 64, torch.float32, seed=6)
    absmax, code = _absmax(state), linear_4bit.code_table("nf4", "cpu")
    x, dy = torch.randn(20, 128), torch.randn(20, 48)
    bias, addend = torch.randn(48), torch.randn(20, 128)
    torch.library.opcheck(torch.ops.unsloth_patch.linear_4bit.default, (x, packed, absmax, code, 64, 48, bias))
    torch.library.opcheck(torch.ops.unsloth_patch.linear_4bit.default, (x, packed, absmax, code, 64, 48, None))
    torch.library.opcheck(torch.ops.unsloth_patch.linear_4bit_dx.default, (dy, packed, absmax, code, 64, 128, addend))
    torch.library.opcheck(torch.ops.unsloth_patch.dequantize_4bit.default,
                          (packed, absmax, code, 64, 48, 128, torch.float16))
