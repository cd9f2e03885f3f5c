"""Linear projections with LoRA adapters, several sharing one input, as one autograd node.

PEFT's LoRA ``Linear`` runs, per call, the base layer, a cast of the adapters' float32 weights,
``lora_A``, ``lora_B``, a product by the scaling and an addition: seven kernels and as many autograd
nodes, each with its Python and dispatcher cost, and in the backward the gradient of the scaled
output (``dy * scaling``, a full ``[tokens, out]`` tensor) before either adapter matmul. On a
training step that the host paces (a LoRA step of a 1B model is) those costs are the step's time.

:func:`projections` computes ``y_i = x @ W_i.T (+ bias_i) + scaling_i * (x @ A_i.T) @ B_i.T`` for
one or more projections of the same input ``x`` in one node:

* the adapters' down projections share one matmul (``x @ [A_1; A_2; ...].T``), so ``x`` is read once
  for all of them, and each low-rank product is added inside the base output's matmul (``addmm``);
* the backward scales the ``[tokens, rank]`` products instead of ``[tokens, out]`` gradients, sums
  ``x``'s gradient inside the matmuls (``addmm``) and computes the adapters' gradients in low-rank
  order (the dense merged weight is never formed);
* gradients go to whatever requires them (adapters, and base weights or biases when trained),
  in each parameter's dtype, as autograd's casts would give them;
* a bitsandbytes 4-bit base weight (QLoRA) is dequantised by bitsandbytes, as its own layer does,
  in the forward and again in the backward: only the packed weight is kept between them (or its dense
  copy kept for the run, or, where asked for, our kernels dequantise it inside the matmul:
  ``projection.base_product``).

A lone projection (plain weight) is computed from native ops instead, ``F.linear`` and an ``addmm`` with
``alpha=scaling``, the same maths, whose backward runs in autograd's C++ engine: for one projection a
Python node costs more host time than the kernels it saves (``benchmarks/lora_host_cost.py``).

Everything runs in ``dtype`` (the autocast dtype, or the inputs' own), as PEFT's layers do under
autocast; ``x``'s gradient comes back in ``x``'s dtype. ``lora_input`` (one projection only) is the
adapter's input when it differs from ``x`` (PEFT's ``lora_dropout``); its gradient is returned
separately, so the dropout's own autograd node finishes it.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .projection import Projection, base_input_grad, base_product

__all__ = ["Projection", "projections", "scaled_mm"]


_NO_CHANGE = contextlib.nullcontext()


def _to(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)  # ``.to`` parses its arguments even when nothing changes


def scaled_mm(a, b, scaling):
    """``scaling * (a @ b)`` in one kernel (``beta=0``: the uninitialised input is ignored, NaNs included)."""
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scaling)


def _in_dtype(device_type: str, dtype):
    """A context in which ops on ``dtype`` tensors compute in ``dtype``: autocast turned off only where it is on
    in another dtype (in its own dtype it casts nothing, and entering a context costs host time on every call)."""
    try:
        if not torch.is_autocast_enabled(device_type) or torch.get_autocast_dtype(device_type) == dtype:
            return _NO_CHANGE
    except (TypeError, RuntimeError):  # a torch or device without per-device autocast queries
        pass
    return torch.autocast(device_type, enabled=False)


class _Projections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_input, dtype, scalings, quant_states, *tensors):
        n = len(scalings)
        shape = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        xc = _to(rows, dtype)
        xl = xc if lora_input is None else _to(lora_input.reshape(-1, lora_input.shape[-1]), dtype)
        parts = [tensors[4 * i:4 * i + 4] for i in range(n)]
        with _in_dtype(x.device.type, dtype):
            kept = [_to(w, dtype) if q is None else w for (w, _, _, _), q in zip(parts, quant_states)]  # 4-bit: packed
            adapted = [i for i, p in enumerate(parts) if p[2] is not None]
            a_cat = h = None
            ups = [None] * n
            if adapted:
                downs = [_to(parts[i][2], dtype) for i in adapted]
                a_cat = downs[0] if len(downs) == 1 else torch.cat(downs, 0)
                h = xl.mm(a_cat.t())  # [tokens, sum of ranks]
            outputs, offset = [], 0
            for i, (_, bias, a, b) in enumerate(parts):
                # a 4-bit weight is dequantised here, one at a time (or inside the matmul)
                y = base_product(xc, kept[i], quant_states[i], dtype, None if bias is None else _to(bias, dtype))
                if a is not None:
                    ups[i] = _to(b, dtype)
                    rank = a.shape[0]
                    # out of place: selective checkpointing may keep the first product, which must stay as made
                    y = torch.addmm(y, h[:, offset:offset + rank], ups[i].t(), alpha=scalings[i])
                    offset += rank
                outputs.append(y.view(*shape, y.shape[-1]))
        ctx.dtype, ctx.scalings, ctx.adapted, ctx.x_dtype = dtype, scalings, adapted, x.dtype
        ctx.quant_states = quant_states  # a 4-bit weight is kept packed and dequantised again in the backward
        ctx.x_shape, ctx.has_lora_input = x.shape, lora_input is not None
        ctx.lora_input_dtype = None if lora_input is None else lora_input.dtype
        ctx.wanted = [t is not None and t.requires_grad for t in tensors]
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None: its work is skipped
        ctx.save_for_backward(xc, None if lora_input is None else xl, h, a_cat, *kept,
                              *[u for u in ups if u is not None])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        xc, xl, h, a_cat, *rest = ctx.saved_tensors
        n, dtype, scalings, adapted, wanted = len(ctx.scalings), ctx.dtype, ctx.scalings, ctx.adapted, ctx.wanted
        weights, ups = list(rest[:n]), dict(zip(adapted, rest[n:]))
        xl = xc if xl is None else xl
        dys = [None if g is None else _to(g.reshape(-1, g.shape[-1]), dtype) for g in grads]
        out: list = [None] * (4 * n)
        with _in_dtype(xc.device.type, dtype):
            dh, offset = None, 0
            if adapted:
                pieces = []
                for i in adapted:
                    rank, dy = ups[i].shape[1], dys[i]
                    h_i = h[:, offset:offset + rank]
                    offset += rank
                    if dy is None:
                        pieces.append(h.new_zeros(h_i.shape))
                        continue
                    if wanted[4 * i + 3]:
                        out[4 * i + 3] = scaled_mm(dy.t(), h_i, scalings[i])
                    pieces.append(scaled_mm(dy, ups[i], scalings[i]))
                dh = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
                if any(wanted[4 * i + 2] and dys[i] is not None for i in adapted):
                    d_a = dh.t().mm(xl)
                    offset = 0
                    for i in adapted:
                        rank = ups[i].shape[1]
                        if wanted[4 * i + 2] and dys[i] is not None:  # no output gradient: None, as autograd's
                            out[4 * i + 2] = d_a[offset:offset + rank]
                        offset += rank
            for i, dy in enumerate(dys):
                if dy is None:
                    continue
                if wanted[4 * i]:
                    out[4 * i] = dy.t().mm(xc)
                if wanted[4 * i + 1]:
                    out[4 * i + 1] = dy.sum(0)
            dx = None
            if ctx.needs_input_grad[0]:
                for i, dy in enumerate(dys):
                    if dy is not None:
                        dx = base_input_grad(dy, weights[i], ctx.quant_states[i], dtype, dx)
                if dh is not None and not ctx.has_lora_input:
                    dx = dh.mm(a_cat) if dx is None else dx.addmm_(dh, a_cat)
                if dx is None:
                    dx = xc.new_zeros(xc.shape)
                dx = _to(dx.view(ctx.x_shape), ctx.x_dtype)
            d_lora_input = None
            if ctx.has_lora_input and ctx.needs_input_grad[1] and dh is not None:
                d_lora_input = _to(dh.mm(a_cat).view(ctx.x_shape), ctx.lora_input_dtype)
        return (dx, d_lora_input, None, None, None, *out)


def projections(x: torch.Tensor, parts: Sequence[Projection], dtype: Optional[torch.dtype] = None,
                lora_input: Optional[torch.Tensor] = None) -> tuple:
    """``(y_1, y_2, ...)``: each projection of ``parts`` applied to ``x`` in ``dtype`` (default ``x.dtype``),
    PEFT's LoRA maths (base output plus ``lora_b(lora_a(x)) * scaling``), in one autograd node."""
    if not parts:
        raise ValueError("projections needs at least one Projection")
    for index, p in enumerate(parts):
        if (p.lora_a is None) != (p.lora_b is None):
            raise ValueError(f"projection {index}: lora_a and lora_b come together (one given without the other)")
        if p.in_features != x.shape[-1]:
            raise ValueError(f"projection {index}: weight takes {p.in_features} features, x has {x.shape[-1]}")
        if p.quant_state is not None and p.weight.requires_grad:
            raise ValueError(f"projection {index}: a 4-bit base weight cannot be trained (it requires grad)")
    if lora_input is not None:
        if len(parts) != 1 or parts[0].lora_a is None:
            raise ValueError("lora_input (the adapter's own input, e.g. after dropout) goes with one adapted projection")
        if lora_input.shape != x.shape:
            raise ValueError(f"lora_input has shape {tuple(lora_input.shape)}, x has {tuple(x.shape)}")
    dtype = dtype or x.dtype
    if _native_applies(x, parts, dtype):
        return _native(x, parts, lora_input)
    tensors = [t for p in parts for t in (p.weight, p.bias, p.lora_a, p.lora_b)]
    scalings = tuple(float(p.scaling) for p in parts)
    quant_states = tuple(p.quant_state for p in parts)
    return _Projections.apply(x, lora_input, dtype, scalings, quant_states, *tensors)


def _native_applies(x, parts, dtype) -> bool:
    """Whether one projection is computed by native ops: a plain (not 4-bit) weight, and either autocast on in
    ``dtype`` (it casts each op's inputs) or every tensor in ``dtype`` already. Groups keep the node: in the
    native graph a sibling whose output nobody uses would hand its adapter a zero gradient instead of none
    (an optimizer step then moves it), and a 4-bit weight would be saved dense for the backward."""
    if len(parts) != 1 or parts[0].quant_state is not None:
        return False
    try:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type) == dtype
    except (TypeError, RuntimeError):
        return False
    return x.dtype == dtype and all(t.dtype == dtype for p in parts
                                    for t in (p.weight, p.bias, p.lora_a, p.lora_b) if t is not None)


def _native(x, parts, lora_input):
    """One projection from native ops, whose backward runs in autograd's C++ engine with no Python (for a lone
    projection the node's Python costs more host time than the kernels it saves): the low-rank product added
    inside an ``addmm``, so neither the forward's ``* scaling`` and addition over ``[tokens, out]`` nor the
    backward's ``dy * scaling`` is made."""
    (p,) = parts
    shape = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    y = F.linear(rows, p.weight, p.bias)
    if p.lora_a is not None:
        source = rows if lora_input is None else lora_input.reshape(-1, lora_input.shape[-1])
        y = torch.addmm(y, F.linear(source, p.lora_a), p.lora_b.t(), alpha=p.scaling)
    return (y.view(*shape, y.shape[-1]),)
