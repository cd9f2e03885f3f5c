"""A linear projection on a bitsandbytes 4-bit weight (nf4 or fp4), dequantised inside the matmul.

bitsandbytes' own path dequantises the whole weight into a 16-bit temporary (one kernel) and hands it
to cuBLAS (another), forward and again backward. These kernels read the packed weight instead: each
tile of the matmul loads its bytes, splits them into the two 4-bit codes (high nibble first, as
bitsandbytes packs them), looks each code up in bitsandbytes' own table (``get_4bit_type``) and
multiplies by its block's scale (float32), then rounds to the compute dtype: the very value
bitsandbytes' dequantisation writes (float32 product, one rounding), so the weight the matmul uses
is bit for bit bitsandbytes' (tested on the CPU interpreter against its kernel; the GPU check is
``benchmarks/linear_4bit.py --check``). No 16-bit copy of the weight is ever made.

Three kernels, each a ``torch.library`` custom op with a fake implementation:

* ``unsloth_patch::linear_4bit``: ``y = x @ W.T (+ bias)``, ``x`` ``[M, K]``, ``W`` ``[N, K]`` packed;
* ``unsloth_patch::linear_4bit_dx``: ``dx = dy @ W (+ addend)``, the input's gradient (the frozen base
  weight has none); ``addend`` lets the caller sum several projections' gradients without an extra add;
* ``unsloth_patch::dequantize_4bit``: ``W`` alone, with the same tile code (what the bit-exactness
  test reads).

The packed weight is bitsandbytes' ``Params4bit`` data: ``N * K / 2`` bytes of the row-major flattened
weight (any storage dtype, viewed as bytes), ``K`` even; the scales are float32, one per ``blocksize``
consecutive values (double quantisation: dequantised once by the caller, ``projection.absmax_of``).
A launch that fails falls back to the same maths in PyTorch, once warned (``_guard``).

Measured on an H100 (``docs/kernel-notes.md``): bit-exact, and 15-32x slower per projection than
bitsandbytes + cuBLAS at training sizes, since each of the ``M / BLOCK_M`` row tiles dequantises the whole
weight again. Opt-in (``UNSLOTH_PATCH_MATMUL_4BIT=fused``), for experiments.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _eager, _guard
from ._triton import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR
from ._triton import tl, triton
from ..settings import triton_interpreting as _interpreting

__all__ = ["QUANT_TYPES", "scale_layout", "takes", "not_taken_reason", "code_table", "linear_4bit", "linear_4bit_dx",
           "dequantize_4bit", "dequantize_reference"]

QUANT_TYPES = ("nf4", "fp4")
KERNEL = "4-bit linear kernel"

if triton is not None:

    @triton.jit
    def _weight_tile(W, ABSMAX, CODE, rows, k0, N, K, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr,
                     COLS: tl.constexpr, SCALES: tl.constexpr):
        """``W[rows, k0:k0+COLS]`` as float32 (zero outside the weight): packed bytes -> codes -> table * scale.

        ``SCALES`` says how the tile meets the scale blocks (:func:`scale_layout`): ``ROW_SCALE``, one block per
        tile row; ``GROUP_SCALES``, whole blocks across the tile; else one scale loaded per value."""
        rows64 = rows.to(tl.int64)
        pairs = tl.arange(0, COLS // 2)
        row_ok = rows < N
        byte_ok = row_ok[:, None] & ((k0 + 2 * pairs) < K)[None, :]
        packed = tl.load(W + (rows64[:, None] * K + k0) // 2 + pairs[None, :], mask=byte_ok, other=0).to(tl.int32)
        codes = tl.reshape(tl.join(packed >> 4, packed & 15), (ROWS, COLS))  # high nibble first
        value = tl.load(CODE + codes)  # codes of masked bytes are 0: a valid index, multiplied by 0
        if SCALES == 1:  # rows of whole blocks, the tile inside one: one scale a row
            row_scale = tl.load(ABSMAX + rows64 * (K // BLOCKSIZE) + k0 // BLOCKSIZE, mask=row_ok, other=0.0)
            scale = tl.broadcast_to(row_scale[:, None], (ROWS, COLS))
        elif SCALES == 2:  # rows of whole blocks, the tile spanning several whole ones
            groups = tl.arange(0, COLS // BLOCKSIZE)
            group_ok = row_ok[:, None] & ((k0 + groups * BLOCKSIZE) < K)[None, :]
            block_scale = tl.load(ABSMAX + rows64[:, None] * (K // BLOCKSIZE) + k0 // BLOCKSIZE + groups[None, :],
                                  mask=group_ok, other=0.0)
            scale = tl.reshape(tl.broadcast_to(block_scale[:, :, None], (ROWS, COLS // BLOCKSIZE, BLOCKSIZE)),
                               (ROWS, COLS))
        else:
            cols = k0 + tl.arange(0, COLS)
            ok = row_ok[:, None] & (cols < K)[None, :]
            scale = tl.load(ABSMAX + (rows64[:, None] * K + cols[None, :]) // BLOCKSIZE, mask=ok, other=0.0)
        return value * scale

    @triton.jit
    def _dequantize_kernel(W, ABSMAX, CODE, OUT, N, K, BLOCKSIZE: tl.constexpr, SCALES: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        k0 = tl.program_id(1) * BLOCK_C
        cols = k0 + tl.arange(0, BLOCK_C)
        w = _weight_tile(W, ABSMAX, CODE, rows, k0, N, K, BLOCKSIZE, BLOCK_R, BLOCK_C, SCALES)
        ok = (rows < N)[:, None] & (cols < K)[None, :]
        tl.store(OUT + rows.to(tl.int64)[:, None] * K + cols[None, :], w.to(OUT.dtype.element_ty), mask=ok)

    # The token count changes every batch: one compiled variant for every M.
    @triton.jit(do_not_specialize=["M"])
    def _linear_kernel(X, W, ABSMAX, CODE, BIAS, Y, M, N, K, stride_xm, stride_ym,
                       BLOCKSIZE: tl.constexpr, SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
                       DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :],
                        mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
            w = _weight_tile(W, ABSMAX, CODE, rn, k0, N, K, BLOCKSIZE, BLOCK_N, BLOCK_K, SCALES).to(X.dtype.element_ty)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit(do_not_specialize=["M"])
    def _linear_dx_kernel(DY, W, ABSMAX, CODE, ADDEND, DX, M, N, K, stride_dym, stride_dxm, stride_am,
                          BLOCKSIZE: tl.constexpr, SCALES: tl.constexpr, HAS_ADDEND: tl.constexpr,
                          DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        k0 = tl.program_id(1) * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            dy = tl.load(DY + rm.to(tl.int64)[:, None] * stride_dym + rn[None, :],
                         mask=(rm < M)[:, None] & (rn < N)[None, :], other=0.0)
            w = _weight_tile(W, ABSMAX, CODE, rn, k0, N, K, BLOCKSIZE, BLOCK_N, BLOCK_K, SCALES).to(DY.dtype.element_ty)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        ok = (rm < M)[:, None] & (rk < K)[None, :]
        if HAS_ADDEND:
            acc += tl.load(ADDEND + rm.to(tl.int64)[:, None] * stride_am + rk[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(DX + rm.to(tl.int64)[:, None] * stride_dxm + rk[None, :], acc.to(DX.dtype.element_ty), mask=ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): first picks for a Hopper card. On an H100 they ran 15-32x
# slower than bitsandbytes + cuBLAS at 5,400 tokens (``benchmarks/linear_4bit.py``): every row tile dequantises the
# whole weight again, which no tile choice removes. The interpreter takes tl.dot's minimum.
# ``dequantize``: (rows, columns) of a tile.
GPU_TILES = {"linear": (128, 128, 64, 8, 3), "linear_dx": (128, 64, 128, 8, 3), "dequantize": (64, 64)}
INTERPRETER_TILES = {"linear": (16, 16, 16, 1, 1), "linear_dx": (16, 16, 16, 1, 1), "dequantize": (16, 16)}


def _tiles(name: str, device) -> tuple:
    return (INTERPRETER_TILES if device.type == "cpu" else GPU_TILES)[name]


PER_VALUE, ROW_SCALE, GROUP_SCALES = 0, 1, 2


def scale_layout(in_features: int, blocksize: int, cols: int) -> int:
    """How a tile ``cols`` wide meets the scale blocks: one scale a row (``ROW_SCALE``) or whole blocks across it
    (``GROUP_SCALES``) where each row holds whole blocks, else a scale loaded per value (``PER_VALUE``)."""
    if in_features % blocksize:
        return PER_VALUE
    if blocksize % cols == 0:
        return ROW_SCALE
    return GROUP_SCALES if cols % blocksize == 0 else PER_VALUE


_CODES: dict = {}  # (quant type, device) -> bitsandbytes' float32 table of the 16 code values


def code_table(quant_type: str, device) -> torch.Tensor:
    """bitsandbytes' own 16 values of ``quant_type`` (float32) on ``device``: the table its dequantisation reads."""
    key = (quant_type, torch.device(device))
    table = _CODES.get(key)
    if table is None:
        from bitsandbytes.functional import get_4bit_type

        table = _CODES[key] = get_4bit_type(quant_type, device=key[1]).to(torch.float32).contiguous()
    return table


def not_taken_reason(packed: torch.Tensor, absmax: torch.Tensor, quant_type, blocksize, shape,
                     dtype: torch.dtype) -> Optional[str]:
    """Why these kernels cannot compute this weight here (None: they can)."""
    if triton is None:
        return f"Triton is not importable ({_TRITON_IMPORT_ERROR!r})"
    if quant_type not in QUANT_TYPES:
        return f"quantisation {quant_type!r} (the kernels read {', '.join(QUANT_TYPES)})"
    if shape is None or len(shape) != 2:
        return f"weight shape {shape} (a 2-D [out, in] weight is taken)"
    out_features, in_features = int(shape[0]), int(shape[1])
    if in_features % 2:
        return f"{in_features} input features (an even count is taken: two codes a byte)"
    if packed.numel() * packed.element_size() * 2 != out_features * in_features or not packed.is_contiguous():
        return "the packed weight is not the contiguous row-major layout bitsandbytes writes"
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        return f"block size {blocksize!r} (a power of two is taken)"
    if absmax.dtype != torch.float32 or absmax.numel() != -(-out_features * in_features // blocksize):
        return "the block scales are not float32, one a block (double-quantised scales are dequantised first)"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"compute dtype {dtype}"
    device = packed.device
    if device.type == "cpu":
        return None if _interpreting() else "CPU tensors (the kernels need a CUDA GPU, or TRITON_INTERPRET=1)"
    if device.type != "cuda":
        return f"{device.type} tensors (the kernels need a CUDA GPU)"
    if dtype == torch.float32:
        return "float32 compute on a GPU (the kernels run 16-bit matmuls there)"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "a GPU of compute capability < 8.0"
    return None


def takes(packed, absmax, quant_type, blocksize, shape, dtype) -> bool:
    return not_taken_reason(packed, absmax, quant_type, blocksize, shape, dtype) is None


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    return packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)


def _precision(dtype) -> Optional[str]:
    return "ieee" if dtype == torch.float32 else None


# ----------------------------------------------------------------------------- Triton launches


def _dequantize_triton(packed, absmax, code, blocksize, out_features, in_features, dtype):
    out = torch.empty((out_features, in_features), device=packed.device, dtype=dtype)
    rows, cols = _tiles("dequantize", packed.device)
    _dequantize_kernel[(triton.cdiv(out_features, rows), triton.cdiv(in_features, cols))](
        _bytes(packed), absmax, code, out, out_features, in_features, BLOCKSIZE=blocksize,
        SCALES=scale_layout(in_features, blocksize, cols), BLOCK_R=rows, BLOCK_C=cols)
    return out


def _linear_triton(x, packed, absmax, code, blocksize, out_features, bias):
    m, k = x.shape
    y = torch.empty((m, out_features), device=x.device, dtype=x.dtype)
    bm, bn, bk, warps, stages = _tiles("linear", x.device)
    _linear_kernel[(triton.cdiv(m, bm), triton.cdiv(out_features, bn))](
        x, _bytes(packed), absmax, code, x if bias is None else bias, y, m, out_features, k, x.stride(0), y.stride(0),
        BLOCKSIZE=blocksize, SCALES=scale_layout(k, blocksize, bk), HAS_BIAS=bias is not None,
        DOT_PRECISION=_precision(x.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y


def _linear_dx_triton(dy, packed, absmax, code, blocksize, in_features, addend):
    m, n = dy.shape
    dx = torch.empty((m, in_features), device=dy.device, dtype=dy.dtype)
    bm, bn, bk, warps, stages = _tiles("linear_dx", dy.device)
    _linear_dx_kernel[(triton.cdiv(m, bm), triton.cdiv(in_features, bk))](
        dy, _bytes(packed), absmax, code, dx if addend is None else addend, dx, m, n, in_features,
        dy.stride(0), dx.stride(0), 0 if addend is None else addend.stride(0),
        BLOCKSIZE=blocksize, SCALES=scale_layout(in_features, blocksize, bk), HAS_ADDEND=addend is not None,
        DOT_PRECISION=_precision(dy.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return dx


# ----------------------------------------------------------------------------- the same maths in PyTorch


def dequantize_reference(packed, absmax, code, blocksize, out_features, in_features, dtype):
    """bitsandbytes' dequantisation written out: codes (high nibble first) -> table value * block scale -> dtype."""
    n = out_features * in_features
    flat = _bytes(packed).reshape(-1)
    codes = torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1)[:n].long()
    scales = absmax.repeat_interleave(blocksize)[:n]
    return (code[codes] * scales).reshape(out_features, in_features).to(dtype)


def _linear_reference(x, packed, absmax, code, blocksize, out_features, bias):
    w = dequantize_reference(packed, absmax, code, blocksize, out_features, x.shape[1], x.dtype)
    return x.mm(w.t()) if bias is None else torch.addmm(bias.to(x.dtype), x, w.t())


def _linear_dx_reference(dy, packed, absmax, code, blocksize, in_features, addend):
    w = dequantize_reference(packed, absmax, code, blocksize, dy.shape[1], in_features, dy.dtype)
    return dy.mm(w) if addend is None else torch.addmm(addend.to(dy.dtype), dy, w)


# ----------------------------------------------------------------------------- the ops


def _dequantize_body(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                     out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    return _guard.run(KERNEL, _dequantize_triton, dequantize_reference,
                      packed, absmax, code, blocksize, out_features, in_features, dtype)


_dequantize_op = torch.library.custom_op("unsloth_patch::dequantize_4bit", _dequantize_body, mutates_args=())


@_dequantize_op.register_fake
def _(packed, absmax, code, blocksize, out_features, in_features, dtype):
    return packed.new_empty((out_features, in_features), dtype=dtype)


def _linear_body(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                 out_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _guard.run(KERNEL, _linear_triton, _linear_reference, x, packed, absmax, code, blocksize, out_features, bias)


_linear_op = torch.library.custom_op("unsloth_patch::linear_4bit", _linear_body, mutates_args=())


@_linear_op.register_fake
def _(x, packed, absmax, code, blocksize, out_features, bias):
    return x.new_empty((x.shape[0], out_features))


def _linear_dx_body(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    in_features: int, addend: Optional[torch.Tensor]) -> torch.Tensor:
    return _guard.run(KERNEL, _linear_dx_triton, _linear_dx_reference,
                      dy, packed, absmax, code, blocksize, in_features, addend)


_linear_dx_op = torch.library.custom_op("unsloth_patch::linear_4bit_dx", _linear_dx_body, mutates_args=())


@_linear_dx_op.register_fake
def _(dy, packed, absmax, code, blocksize, in_features, addend):
    return dy.new_empty((dy.shape[0], in_features))


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
                shape, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the 4-bit weight ``W`` of ``shape`` ``[out, in]``, in ``x``'s dtype, ``[..., out]``.
    No gradient of its own: a caller's autograd node computes ``x``'s with :func:`linear_4bit_dx`."""
    rows = _rows(x)
    out_features = int(shape[0])
    y = _eager.call(_linear_op, _linear_body, rows, packed, absmax, code_table(quant_type, x.device), int(blocksize),
                    out_features, None if bias is None else bias.to(x.dtype).contiguous())
    return y.view(*x.shape[:-1], out_features)


def linear_4bit_dx(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
                   shape, addend: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dy @ W (+ addend)``, ``dy`` ``[M, out]``: the input gradient of :func:`linear_4bit`, ``[M, in]``."""
    return _eager.call(_linear_dx_op, _linear_dx_body, _rows(dy), packed, absmax, code_table(quant_type, dy.device),
                       int(blocksize), int(shape[1]), None if addend is None else _rows(addend))


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, shape,
                    dtype: torch.dtype) -> torch.Tensor:
    """The weight ``[out, in]`` in ``dtype``, from the same tile code the matmuls run (what the exactness test reads)."""
    return _eager.call(_dequantize_op, _dequantize_body, packed, absmax, code_table(quant_type, packed.device),
                       int(blocksize), int(shape[0]), int(shape[1]), dtype)
