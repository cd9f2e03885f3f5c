"""A gated MLP that stores none of its intermediate activations: token chunks forward, recomputed backward.

``down(act(gate(x)) * up(x))`` holds, per token, the gate and up projections, their gated product
and, in the backward, the gradients of all three: six ``intermediate``-wide tensors (96 KiB a
token for a 1.1B Llama with intermediate 8192, bf16) against the 4 KiB of ``x``. Under
checkpointing the recomputed layer's MLP is the largest thing a LoRA step holds. Here the forward
runs in chunks of ``chunk`` tokens and keeps only ``x``; the backward recomputes each chunk's
projections and product, and frees them before the next chunk. At most one chunk's three
intermediate tensors are live: the forward's gate, up and product; in the backward the product goes once
the down projection's parameter gradients are taken, before its gradient is formed, and the activation's
gradients overwrite the projections.

Each projection is a :class:`Projection`: a base weight (plain, or bitsandbytes 4-bit: dequantised once in the
forward and once in the backward, dense only while the MLP runs) and, optionally, one LoRA adapter
(``lora_b(lora_a(x)) * scaling`` added to the base output, PEFT's maths in its dtype, the addition and
the scaling inside the low-rank matmul as ``kernels/lora_linear.py`` does them; the backward scales
the ``[tokens, rank]`` products, never an intermediate-wide gradient). Gradients go to whichever tensors require them: the adapters (low-rank order: the
dense merged weight is never formed) and the base weights when they are trained; they are summed
over the chunks in float32. Everything runs in ``dtype`` (the autocast dtype, or the input's);
``x``'s gradient comes back in ``x``'s dtype.

``skip=True`` returns an uninitialised output of the right shape and only saves ``x``: for a
checkpointed layer's recomputation, whose MLP output nobody reads when the MLP is the layer's last
saving operation (``mlp_recompute`` decides that; the backward uses the original forward's node).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import swiglu
from .lora_linear import scaled_mm
from .projection import Projection, dense_weight

__all__ = ["Projection", "chunked_gated_mlp", "CHUNK_TOKENS"]

CHUNK_TOKENS = 2048  # one chunk's intermediate tensors: 3 x 2048 x intermediate x 2 bytes (96 MiB at 8192)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _weights(tensors, quant_states, dtype):
    """The nine tensors in ``dtype``, each 4-bit base weight (positions 0, 3, 6) dequantised."""
    w = [_cast(t, dtype) if i % 3 or quant_states[i // 3] is None else None for i, t in enumerate(tensors)]
    for k, state in enumerate(quant_states):
        if state is not None:
            w[3 * k] = dense_weight(tensors[3 * k], state, dtype)
    return w


def _project(x, weight, a, b, scaling):
    y = F.linear(x, weight)
    if a is not None:  # the low-rank product added inside its matmul, into ``y``: no output-wide temporaries
        y = y.addmm_(F.linear(x, a), b.t(), alpha=scaling)
    return y


_WIDE_ADDMM = [True]  # torch.addmm(..., out_dtype=float32) into the accumulator; off once it fails


def _accumulate(store, key, a, b):
    """Add ``a @ b`` to a parameter's gradient over the chunks: the first chunk's as computed, the sum in float32
    from the second on (on CUDA the product is added inside the matmul, with no half-precision copy)."""
    acc = store[key]
    if acc is None:
        store[key] = a.mm(b)
        return
    if acc.dtype != torch.float32:
        acc = store[key] = acc.float()
    if a.dtype != torch.float32 and a.is_cuda and _WIDE_ADDMM[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _WIDE_ADDMM[0] = False
    acc.add_(a.mm(b))


def _gate_up(xc, w, scalings):
    """One chunk's gate and up projections."""
    return _project(xc, w[0], w[1], w[2], scalings[0]), _project(xc, w[3], w[4], w[5], scalings[1])


class _ChunkedGatedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, settings, *tensors):
        gelu, dtype, chunk, skip, scalings, quant_states = settings
        ctx.settings = settings
        ctx.tensors = tensors  # parameters: plain references, nothing saved for them
        ctx.save_for_backward(x)
        rows = x.reshape(-1, x.shape[-1])
        out_features = tensors[6].shape[0] if quant_states[2] is None else quant_states[2].shape[0]
        out = rows.new_empty((rows.shape[0], out_features), dtype=dtype)
        if skip:
            return out.view(*x.shape[:-1], out_features)
        with torch.autocast(x.device.type, enabled=False):
            w = _weights(tensors, quant_states, dtype)
            for start in range(0, rows.shape[0], chunk):
                xc = rows[start:start + chunk].to(dtype)
                gate, up = _gate_up(xc, w, scalings)
                hidden = swiglu.gated_forward_plain(gate, up, gelu)
                del gate, up
                out[start:start + chunk] = _project(hidden, w[6], w[7], w[8], scalings[2])
                del hidden  # not held into the next chunk's projections
        return out.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        gelu, dtype, chunk, _, scalings, quant_states = ctx.settings
        tensors = ctx.tensors
        wanted = [t is not None and t.requires_grad for t in tensors]
        grads: list = [None] * len(tensors)
        rows = x.reshape(-1, x.shape[-1])
        dy_rows = grad_out.reshape(-1, grad_out.shape[-1])
        dx = torch.empty(rows.shape, dtype=x.dtype, device=x.device) if ctx.needs_input_grad[0] else None
        with torch.autocast(x.device.type, enabled=False):
            w = _weights(tensors, quant_states, dtype)
            for start in range(0, rows.shape[0], chunk):
                xc = rows[start:start + chunk].to(dtype)
                dy = dy_rows[start:start + chunk].to(dtype)
                gate, up = _gate_up(xc, w, scalings)
                hidden = swiglu.gated_forward_plain(gate, up, gelu)
                d_low = _parameter_grads(dy, hidden, w, wanted, grads, 6, scalings[2])
                del hidden  # the down projection's gradients are taken: its input goes before its input's gradient
                d_hidden = _input_grad_from(dy, w, 6, d_low)
                d_gate, d_up = swiglu.gated_backward_into(d_hidden, gate, up, gelu)
                del d_hidden
                d_x = _input_grad(d_gate, xc, w, wanted, grads, 0, scalings[0])
                d_x = d_x.add_(_input_grad(d_up, xc, w, wanted, grads, 3, scalings[1]))
                if dx is not None:
                    dx[start:start + chunk] = d_x
                del gate, up, d_gate, d_up, d_x
        out = [None if g is None else g.to(t.dtype) for g, t in zip(grads, tensors)]
        return (None if dx is None else dx.view(x.shape), None, *out)


def _input_grad(dy, inp, w, wanted, grads, at, scaling):
    """The projection ``at`` (its weight, lora_a, lora_b in ``w[at:at + 3]``) given its output's gradient ``dy``
    and its input ``inp``: accumulates the parameters' gradients into ``grads``, returns the input's gradient."""
    return _input_grad_from(dy, w, at, _parameter_grads(dy, inp, w, wanted, grads, at, scaling))


def _parameter_grads(dy, inp, w, wanted, grads, at, scaling):
    """Accumulates the gradients of the projection ``at``'s parameters, the last use of ``inp``; returns the
    adapter's ``[tokens, rank]`` gradient (None without one) for :func:`_input_grad_from`. ``scaling`` multiplies
    the ``[tokens, rank]`` products, not ``dy`` itself: no output-wide copy of ``dy`` (the same numbers where
    ``scaling`` is a power of two, as alpha / r usually is)."""
    weight, a, b = w[at], w[at + 1], w[at + 2]
    if wanted[at]:
        _accumulate(grads, at, dy.t(), inp)
    if a is None:
        return None
    if wanted[at + 2]:
        _accumulate(grads, at + 2, dy.t(), scaled_mm(inp, a.t(), scaling))
    d_low = scaled_mm(dy, b, scaling)  # [tokens, rank]
    if wanted[at + 1]:
        _accumulate(grads, at + 1, d_low.t(), inp)
    return d_low


def _input_grad_from(dy, w, at, d_low):
    """The input's gradient of the projection ``at``: the base part, plus the adapter's added inside the matmul
    (``addmm_``, in place: the input-wide product is never a tensor of its own)."""
    d_inp = dy.mm(w[at])
    return d_inp if d_low is None else d_inp.addmm_(d_low, w[at + 1])


def chunked_gated_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection, activation: str = "silu",
                      dtype: Optional[torch.dtype] = None, chunk: int = CHUNK_TOKENS, skip: bool = False):
    """``down(act(gate(x)) * up(x))`` in ``dtype`` (default ``x.dtype``), keeping only ``x`` for the backward."""
    if activation not in swiglu.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {swiglu.ACTIVATIONS}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    for name, p in (("gate", gate), ("up", up), ("down", down)):
        if p.bias is not None:
            raise ValueError(f"{name}: the chunked MLP takes bias-free projections (a bias was given)")
        if (p.lora_a is None) != (p.lora_b is None):
            raise ValueError(f"{name}: lora_a and lora_b come together (one given without the other)")
    tensors = (*gate[:3], *up[:3], *down[:3])
    settings = (activation == "gelu_tanh", dtype or x.dtype, int(chunk), bool(skip),
                (float(gate.scaling), float(up.scaling), float(down.scaling)),
                (gate.quant_state, up.quant_state, down.quant_state))
    return _ChunkedGatedMLP.apply(x, settings, *tensors)
