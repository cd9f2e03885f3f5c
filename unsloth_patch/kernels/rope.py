"""Fused rotary position embedding (RoPE) in Triton: q and k in one launch, forward and backward.

transformers applies RoPE in the half-rotation layout::

    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
    q_embed = q * cos + rotate_half(q) * sin          (and the same for k)

which eager PyTorch runs as two slices, a negation, a concatenation, two products and a sum, for
q and for k, and again (transposed) in the backward: 10 launches a layer forward and 20 backward
(counted on an H200, transformers 5.17). Here one launch rotates q and k together, each way. Writing ``x = [x1, x2]`` and ``cos = [c1, c2]``, ``sin = [s1, s2]``
by halves, the forward is::

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2

and the backward is the transpose of that linear map (for transformers' ``cos = [c, c]``,
``sin = [s, s]`` it is the rotation by ``-sin``)::

    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1

Shapes: ``q [B, Hq, T, D]`` and ``k [B, Hk, T, D]`` (any head counts, so GQA; any strides with a
unit stride along ``D``: the ``view(...).transpose(1, 2)`` of the projections is read in place),
``cos``/``sin`` ``[B, T, D]`` or ``[1, T, D]`` (broadcast over the batch). The tables are per token,
so the restarting ``position_ids`` of a padding-free row need nothing special. ``D`` must be even.
Inputs fp32, fp16 or bf16; all arithmetic in fp32; outputs in ``promote_types(q.dtype, cos.dtype)``
(what the eager expression gives), laid out like the inputs (``empty_like``).

One program per ``BLOCK_T`` consecutive tokens (flattened over the batch): it loads those tokens'
half-rows of ``cos``/``sin`` once and rotates every head of q and then of k, ``BLOCK_HQ`` /
``BLOCK_HK`` heads at a time, as ``[BLOCK_T, heads, D/2]`` tiles of at most ``_TILE`` elements (for a
1B Llama, 32/8 heads of 64: two tokens a program, all 32 q heads in one tile; for the tiny test
models 64 tokens a program, which keeps the Triton interpreter fast). The outputs are new tensors
(out of place): nothing is saved for the backward but ``cos`` and ``sin``, which the model keeps
anyway.

The kernel runs inside ``torch.library`` custom ops (``unsloth_patch::rope`` and
``unsloth_patch::rope_backward``) with fake implementations and a registered autograd formula, so
``torch.compile`` treats it as one opaque operation (an eager call runs the op's body directly, without
the dispatcher: ``_eager.py``). No gradient flows to ``cos``/``sin`` (transformers
computes them under ``no_grad``; the wiring does not route tables that require grad here). Importing
this module never needs Triton; calling :func:`rope` does (if a launch fails, the op computes the
same maths in PyTorch, once warned).
"""

from __future__ import annotations


import torch

from . import _eager, _guard
from ._triton import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR
from ._triton import tl, triton
from ..settings import triton_interpreting as _interpreting

__all__ = ["rope", "rope_reference", "is_supported", "DTYPES"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 1024
# per program, at most this many elements of each half-tile (heads x D/2) are live at once
_TILE = 2048


def is_supported(device, dtype, head_dim: int) -> bool:
    """Whether :func:`rope` runs for ``head_dim`` on ``device`` in ``dtype``."""
    if triton is None or dtype not in DTYPES or head_dim < 2 or head_dim % 2 or head_dim > _MAX_HEAD_DIM:
        return False
    return torch.device(device).type == "cuda" or _interpreting()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The eager spelling the kernel computes: ``q * cos + rotate_half(q) * sin`` for q and k.

    ``q``/``k`` ``[B, H, T, D]``, ``cos``/``sin`` ``[B or 1, T, D]``; autograd-able, any dtype (tests and
    the wiring's probe run it in float32/float64).
    """
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _out_dtype(q: torch.Tensor, cos: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, cos.dtype)


if triton is not None:

    @triton.jit
    def _rotate_heads(X, Y, H, sxb, sxh, sxt, syb, syh, syt, b, t, token_ok, c1, c2, a, bb, cols, col_ok,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        # y1 = x1 * c1 + x2 * a ; y2 = x2 * c2 + x1 * bb, for BLOCK_T tokens, BLOCK_H heads at a time
        x_token = (b * sxb + t * sxt)[:, None, None]
        y_token = (b * syb + t * syt)[:, None, None]
        c1, c2, a, bb = c1[:, None, :], c2[:, None, :], a[:, None, :], bb[:, None, :]
        for h0 in range(0, H, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            mask = token_ok[:, None, None] & (heads < H)[None, :, None] & col_ok[None, None, :]
            x_ptr = X + x_token + heads[None, :, None] * sxh + cols[None, None, :]
            y_ptr = Y + y_token + heads[None, :, None] * syh + cols[None, None, :]
            x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr, (x1 * c1 + x2 * a).to(Y.dtype.element_ty), mask=mask)
            tl.store(y_ptr + HALF, (x2 * c2 + x1 * bb).to(Y.dtype.element_ty), mask=mask)

    # token counts and batch strides change with every batch: one compile for all of them
    @triton.jit(do_not_specialize=["n_tokens", "T", "sqb", "skb", "sob", "spb", "scb", "ssb"])
    def _rope_kernel(
        Q, K, COS, SIN, QO, KO, n_tokens, T, HQ, HK,
        sqb, sqh, sqt, skb, skh, skt,
        sob, soh, sot, spb, sph, spt,
        scb, sct, ssb, sst,
        HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        token_ok = tokens < n_tokens
        b = tokens // T
        t = tokens % T
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < HALF
        table_mask = token_ok[:, None] & col_ok[None, :]
        c_ptr = COS + (b * scb + t * sct)[:, None] + cols[None, :]
        s_ptr = SIN + (b * ssb + t * sst)[:, None] + cols[None, :]
        c1 = tl.load(c_ptr, mask=table_mask, other=0.0).to(tl.float32)
        c2 = tl.load(c_ptr + HALF, mask=table_mask, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptr, mask=table_mask, other=0.0).to(tl.float32)
        s2 = tl.load(s_ptr + HALF, mask=table_mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
            a = s2
            bb = -s1
        else:  # y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
            a = -s1
            bb = s2
        _rotate_heads(Q, QO, HQ, sqb, sqh, sqt, sob, soh, sot, b, t, token_ok, c1, c2, a, bb, cols, col_ok,
                      HALF, BLOCK_HQ)
        _rotate_heads(K, KO, HK, skb, skh, skt, spb, sph, spt, b, t, token_ok, c1, c2, a, bb, cols, col_ok,
                      HALF, BLOCK_HK)


KERNEL = "RoPE kernel"


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _blocks(half: int, heads_q: int, heads_k: int, n_tokens: int) -> tuple[int, int, int, int]:
    """``(BLOCK_D, BLOCK_T, BLOCK_HQ, BLOCK_HK)``: a [tokens, heads, D/2] tile of at most ``_TILE`` elements."""
    block_d = triton.next_power_of_2(half)
    per_tile = max(1, _TILE // block_d)
    block_hq = min(triton.next_power_of_2(max(heads_q, 1)), per_tile)
    block_hk = min(triton.next_power_of_2(max(heads_k, 1)), per_tile)
    block_t = max(1, min(per_tile // max(block_hq, block_hk), triton.next_power_of_2(n_tokens)))
    return block_d, block_t, block_hq, block_hk


def _table_strides(table: torch.Tensor) -> tuple[int, int]:
    # a [1, T, D] table is broadcast over the batch: batch stride 0
    return (0 if table.shape[0] == 1 else table.stride(0)), table.stride(1)


def _launch(x_q, x_k, cos, sin, out_dtype, backward: bool):
    x_q, x_k, cos, sin = (_unit_last(t) for t in (x_q, x_k, cos, sin))
    out_q = torch.empty_like(x_q, dtype=out_dtype)
    out_k = torch.empty_like(x_k, dtype=out_dtype)
    batch, heads_q, tokens, dim = x_q.shape
    heads_k = x_k.shape[1]
    if batch * tokens == 0 or (heads_q == 0 and heads_k == 0):
        return out_q, out_k
    half = dim // 2
    n_tokens = batch * tokens
    block_d, block_t, block_hq, block_hk = _blocks(half, heads_q, heads_k, n_tokens)
    _rope_kernel[(triton.cdiv(n_tokens, block_t),)](
        x_q, x_k, cos, sin, out_q, out_k, n_tokens, tokens, heads_q, heads_k,
        x_q.stride(0), x_q.stride(1), x_q.stride(2), x_k.stride(0), x_k.stride(1), x_k.stride(2),
        out_q.stride(0), out_q.stride(1), out_q.stride(2), out_k.stride(0), out_k.stride(1), out_k.stride(2),
        *_table_strides(cos), *_table_strides(sin),
        HALF=half, BLOCK_D=block_d, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BACKWARD=backward,
        num_warps=4,
    )
    return out_q, out_k


def _forward_triton(q, k, cos, sin):
    return _launch(q, k, cos, sin, _out_dtype(q, cos), backward=False)


def _backward_triton(dq, dk, cos, sin):
    return _launch(dq, dk, cos, sin, dq.dtype, backward=True)


def _forward_reference(q, k, cos, sin):
    """fp32 PyTorch of the kernel's forward (the fallback after a failed launch)."""
    dtype = _out_dtype(q, cos)
    qo, ko = rope_reference(q.float(), k.float(), cos.float(), sin.float())
    return qo.to(dtype), ko.to(dtype)


def _backward_reference(dq, dk, cos, sin):
    """fp32 PyTorch of the kernel's backward: ``dx = dy * cos - rotate_half(dy * sin)``."""
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)

    def transpose(dy):
        dyf = dy.float()
        return (dyf * c - _rotate_half(dyf * s)).to(dy.dtype)

    return transpose(dq), transpose(dk)


def _rope_body(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _guard.run(KERNEL, _forward_triton, _forward_reference, q, k, cos, sin)


_rope_op = torch.library.custom_op("unsloth_patch::rope", _rope_body, mutates_args=())


@_rope_op.register_fake
def _(q, k, cos, sin):
    dtype = _out_dtype(q, cos)
    return torch.empty_like(q, dtype=dtype), torch.empty_like(k, dtype=dtype)


def _rope_backward_body(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _guard.run(KERNEL, _backward_triton, _backward_reference, dq, dk, cos, sin)


_rope_backward_op = torch.library.custom_op("unsloth_patch::rope_backward", _rope_backward_body, mutates_args=())


@_rope_backward_op.register_fake
def _(dq, dk, cos, sin):
    return torch.empty_like(dq), torch.empty_like(dk)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.dtypes = (q.dtype, k.dtype)


def _rope_grad(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = _eager.call(_rope_backward_op, _rope_backward_body, dq_out, dk_out, cos, sin)
    q_dtype, k_dtype = ctx.dtypes
    return dq.to(q_dtype), dk.to(k_dtype), None, None


_rope_op.register_autograd(_rope_grad, setup_context=_setup_context)
_rope_apply = _eager.differentiable(_rope_body, _setup_context, _rope_grad, "RoPE")


def check_arguments(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str:
    """Why :func:`rope` cannot take these arguments ("" when it can); device-independent."""
    if q.dim() != 4 or k.dim() != 4:
        return "q and k must be [B, H, T, D]"
    batch, _, tokens, dim = q.shape
    if k.shape[0] != batch or k.shape[2] != tokens or k.shape[3] != dim:
        return f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, tokens or head dim"
    if dim % 2 or dim > _MAX_HEAD_DIM:
        return f"head dim {dim} is odd or over {_MAX_HEAD_DIM}"
    if cos.dim() != 3 or cos.shape != sin.shape:
        return "cos and sin must be [B, T, D] or [1, T, D] of one shape"
    if cos.shape[0] not in (1, batch) or cos.shape[1] != tokens or cos.shape[2] != dim:
        return f"cos {tuple(cos.shape)} does not match q {tuple(q.shape)} (a partial rotary dim?)"
    if q.dtype != k.dtype or cos.dtype != sin.dtype:
        return "q and k (and cos and sin) must share a dtype"
    if q.dtype not in DTYPES or cos.dtype not in DTYPES:
        return f"unsupported dtype {q.dtype} / {cos.dtype}"
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        return "tensors on different devices"
    return ""


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``, fused (module docstring)."""
    if triton is None:
        raise RuntimeError(f"rope needs Triton, which failed to import: {_TRITON_IMPORT_ERROR}")
    why = check_arguments(q, k, cos, sin)
    if why:
        raise ValueError(f"rope: {why}")
    return _rope_apply(_rope_op, _unit_last(q), _unit_last(k), cos, sin)
