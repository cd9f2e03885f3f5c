"""Fused RMSNorm in Triton, forward and backward.

``y = weight * x / sqrt(mean(x^2) + eps)`` over the last dimension, in the two spellings
transformers uses:

* Llama / Mistral / Qwen2 / Qwen3 (``offset=0``): the normalised row is computed in fp32,
  cast back to the input dtype, then multiplied by ``weight``; the result has the promoted
  dtype of ``weight`` and ``x`` (exactly ``LlamaRMSNorm.forward``).
* Gemma (``offset=1``): ``x_normed * (1 + weight)`` computed in fp32 and cast to the input
  dtype once at the end (``GemmaRMSNorm.forward``).

The input is viewed as ``[M, N]`` rows (Qwen3's per-head ``q_norm``/``k_norm`` are rows of
``head_dim``). One program normalises ``BLOCK_M`` rows at a time; the forward saves only the
fp32 reciprocal RMS per row (4 bytes a row) besides the input.

Backward, with ``r = rstd``, ``n = x * r`` and ``g = dy * (offset + weight)``::

    dx = r * (g - n * mean(g * n))
    dweight = sum over rows of dy * n      (n as cast in the forward for offset=0)

``dweight`` is deterministic: a fixed grid of programs (a multiple of the multiprocessor
count) each walks a fixed set of rows (a contiguous chunk, one row at a time, for rows of 512
elements or more; strided blocks of ``BLOCK_M`` rows for short rows such as per-head norms)
and writes its own fp32 partial sum; the partials are then reduced by ``torch.sum`` over the
program axis. No atomics.

The kernels run inside ``torch.library`` custom ops (``unsloth_patch::rms_norm`` and its
backward) with fake implementations, so ``torch.compile`` treats them as single opaque
operations. Importing this module never needs Triton; calling :func:`rms_norm` does (if a
launch fails, the op computes the same maths in PyTorch, once warned).
"""

from __future__ import annotations

import functools

import torch

from . import _eager, _guard
from ._triton import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR
from ._triton import tl, triton
from ..settings import triton_interpreting as _interpreting

__all__ = ["rms_norm", "rms_norm_reference", "is_supported"]

_MAX_N = 65536


def is_supported(device, dtype, n: int) -> bool:
    """Whether :func:`rms_norm` runs for rows of ``n`` elements on ``device`` in ``dtype``."""
    if triton is None or n < 1 or n > _MAX_N:
        return False
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return torch.device(device).type == "cuda" or _interpreting()


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """The PyTorch spelling the kernel reproduces (used by tests, benchmarks and the wiring's probe)."""
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (offset + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


if triton is not None:

    @triton.jit(do_not_specialize=["M"])  # row counts change every batch: one compile
    def _rms_forward(
        X, W, Y, RSTD, M, N, stride_x, stride_y, eps, offset,
        OFFSET_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        normed = x * rstd[:, None]
        if OFFSET_MODE:
            y = normed * (w[None, :] + offset)
        else:
            # cast to the input dtype first, as transformers' Llama-style norms do
            y = normed.to(X.dtype.element_ty).to(tl.float32) * w[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit(do_not_specialize=["M", "blocks_per_program"])
    def _rms_backward(
        DY, X, W, RSTD, DX, DW_PARTIAL, M, N, stride_dy, stride_x, stride_dx, offset, blocks_per_program,
        OFFSET_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        if OFFSET_MODE:
            w = w + offset
        dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, blocks_per_program):
            block = pid + i * programs
            rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            mask = row_ok[:, None] & col_ok[None, :]
            rows64 = rows.to(tl.int64)
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            normed = x * rstd[:, None]
            if OFFSET_MODE:
                dw += dy * normed
            else:
                dw += dy * normed.to(X.dtype.element_ty).to(tl.float32)
            g = dy * w[None, :]
            dot = tl.sum(g * normed, axis=1) / N
            dx = rstd[:, None] * (g - normed * dot[:, None])
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw, axis=0), mask=col_ok)


    @triton.jit(do_not_specialize=["M", "rows_per_program"])
    def _rms_backward_rows(
        DY, X, W, RSTD, DX, DW_PARTIAL, M, N, stride_dy, stride_x, stride_dx, offset, rows_per_program,
        OFFSET_MODE: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # one row at a time over a contiguous chunk of rows; dweight accumulates in a 1-D register row
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        if OFFSET_MODE:
            w = w + offset
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        for i in range(0, rows_per_program):
            row64 = first + i
            mask = cols < tl.where(row64 < M, N, 0)  # an empty row past the end
            x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + tl.minimum(row64, M - 1))
            normed = x * rstd
            if OFFSET_MODE:
                dw += dy * normed
            else:
                dw += dy * normed.to(X.dtype.element_ty).to(tl.float32)
            g = dy * w
            dot = tl.sum(g * normed, axis=0) / N
            dx = rstd * (g - normed * dot)
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)


# Backward launch knobs (benchmarks/kernels.py sweeps them): rows of at least ROWS_KERNEL_MIN_N
# elements use the one-row-at-a-time kernel with PROGRAMS_PER_SM programs per multiprocessor.
# 8 programs a multiprocessor and 8 warps were fastest on an H100 at 8192 x 2048 (docs/kernels.md).
BACKWARD = {"rows_kernel_min_n": 512, "programs_per_sm": 8, "row_warps": 8}


def _blocks(n: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(64, 4096 // block_n))
    warps = 4 if block_m * block_n <= 4096 else 8
    if block_m * block_n >= 16384:
        warps = 16
    return block_m, block_n, warps


@functools.lru_cache(maxsize=16)
def _multiprocessors(device_index: int) -> int:
    if _interpreting() or not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


KERNEL = "RMSNorm kernel"


def _output_dtype(x_dtype, weight_dtype, offset):
    return x_dtype if offset else torch.promote_types(weight_dtype, x_dtype)


def _forward_triton(x2, weight, eps, offset):
    m, n = x2.shape
    y = torch.empty((m, n), dtype=_output_dtype(x2.dtype, weight.dtype, offset), device=x2.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x2.device)
    block_m, block_n, warps = _blocks(n)
    if m:
        _rms_forward[(triton.cdiv(m, block_m),)](
            x2, weight, y, rstd, m, n, x2.stride(0), y.stride(0), float(eps), float(offset),
            OFFSET_MODE=bool(offset), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    return y, rstd


def _backward_triton(dy2, x2, weight, rstd, offset):
    m, n = x2.shape
    dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if not m:
        return dx, torch.zeros_like(weight)
    index = x2.device.index if x2.device.type == "cuda" else 0
    budget = max(1, _multiprocessors(index or 0) * BACKWARD["programs_per_sm"])
    mode = bool(offset)
    if n >= BACKWARD["rows_kernel_min_n"]:
        block_n = triton.next_power_of_2(n)
        per_program = triton.cdiv(m, min(m, budget))
        programs = triton.cdiv(m, per_program)
        partial = torch.empty((programs, n), dtype=torch.float32, device=x2.device)
        _rms_backward_rows[(programs,)](
            dy2, x2, weight, rstd, dx, partial, m, n, dy2.stride(0), x2.stride(0), dx.stride(0),
            offset, per_program, OFFSET_MODE=mode, BLOCK_N=block_n,
            num_warps=min(16, max(BACKWARD["row_warps"], block_n // 1024)),
        )
    else:
        block_m, block_n, warps = _blocks(n)
        blocks = triton.cdiv(m, block_m)
        programs = max(1, min(blocks, budget))
        partial = torch.empty((programs, n), dtype=torch.float32, device=x2.device)
        _rms_backward[(programs,)](
            dy2, x2, weight, rstd, dx, partial, m, n, dy2.stride(0), x2.stride(0), dx.stride(0),
            offset, triton.cdiv(blocks, programs),
            OFFSET_MODE=mode, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    return dx, partial.sum(0).to(weight.dtype)


def _forward_reference(x2, weight, eps, offset):
    xf = x2.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    normed = xf * rstd[:, None]
    if offset:
        y = normed * (weight.float() + offset)
    else:
        y = normed.to(x2.dtype).float() * weight.float()
    return y.to(_output_dtype(x2.dtype, weight.dtype, offset)), rstd


def _backward_reference(dy2, x2, weight, rstd, offset):
    xf, dyf = x2.float(), dy2.float()
    normed = xf * rstd[:, None]
    g = dyf * (weight.float() + offset)
    dx = rstd[:, None] * (g - normed * (g * normed).mean(-1, keepdim=True))
    seen = normed if offset else normed.to(x2.dtype).float()
    return dx.to(x2.dtype), (dyf * seen).sum(0).to(weight.dtype)


def _rms_norm_body(x2: torch.Tensor, weight: torch.Tensor, eps: float,
                   offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _guard.run(KERNEL, _forward_triton, _forward_reference, x2, weight, eps, offset)


_rms_norm_op = torch.library.custom_op("unsloth_patch::rms_norm", _rms_norm_body, mutates_args=())


@_rms_norm_op.register_fake
def _(x2, weight, eps, offset):
    y = x2.new_empty(x2.shape, dtype=_output_dtype(x2.dtype, weight.dtype, offset))
    return y, x2.new_empty((x2.shape[0],), dtype=torch.float32)


def _rms_norm_backward_body(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                            offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _guard.run(KERNEL, _backward_triton, _backward_reference, dy2, x2, weight, rstd, offset)


_rms_norm_backward_op = torch.library.custom_op("unsloth_patch::rms_norm_backward", _rms_norm_backward_body,
                                                mutates_args=())


@_rms_norm_backward_op.register_fake
def _(dy2, x2, weight, rstd, offset):
    return torch.empty_like(x2), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x2, weight, _, offset = inputs
    ctx.save_for_backward(x2, weight, output[1])
    ctx.offset = float(offset)


def _rms_norm_grad(ctx, dy, _drstd):
    x2, weight, rstd = ctx.saved_tensors
    dx, dweight = _eager.call(_rms_norm_backward_op, _rms_norm_backward_body,
                              _rows(dy, x2.shape[1]), x2, weight, rstd, ctx.offset)
    return dx, dweight, None, None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_setup_context)
_rms_norm_apply = _eager.differentiable(_rms_norm_body, _setup_context, _rms_norm_grad, "RMSNorm")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Fused RMSNorm of ``x`` over its last dimension (see the module docstring for ``offset``)."""
    if triton is None:
        raise RuntimeError(f"rms_norm needs Triton, which failed to import: {_TRITON_IMPORT_ERROR}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match rows of {x.shape[-1]}")
    shape = x.shape
    y, _ = _rms_norm_apply(_rms_norm_op, _rows(x, shape[-1]), weight, float(eps), float(offset))
    return y.view(*shape[:-1], shape[-1])
