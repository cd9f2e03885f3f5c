"""Fused gated activations in Triton: ``act(gate) * up``, forward and backward.

The MLP of Llama-style models is ``down_proj(act(gate_proj(x)) * up_proj(x))``. The matrix
products stay in cuBLAS; this module fuses the elementwise middle, which eager PyTorch runs as
two kernels forward (activation, product) and three backward, each reading and writing full
``[tokens, intermediate]`` tensors.

* ``swiglu(gate, up) = silu(gate) * up`` (Llama, Mistral, Qwen2, Qwen3).
* ``geglu(gate, up) = gelu_tanh(gate) * up`` (Gemma's ``gelu_pytorch_tanh``).

The forward saves ``gate`` and ``up`` (which the projections produce anyway) and the backward
recomputes the activation in fp32 from ``gate``, producing ``dgate`` and ``dup`` in one pass:
it reads ``dy, gate, up`` and writes ``dgate, dup``, nothing else. All arithmetic is fp32;
results are cast to the inputs' dtype.

Derivatives used::

    silu(g)  = g * s,  s = sigmoid(g);  silu'(g) = s * (1 + g * (1 - s))
    gelu_tanh(g) = 0.5 * g * (1 + t),  t = tanh(k * (g + 0.044715 g^3)),  k = sqrt(2 / pi)
    gelu_tanh'(g) = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * k * (1 + 3 * 0.044715 g^2)

``tanh`` is written as ``2 * sigmoid(2z) - 1`` so the kernels use only ``exp``.

The kernels run inside ``torch.library`` custom ops (``unsloth_patch::gated_activation`` and
its backward) with fake implementations, so ``torch.compile`` treats them as single opaque
operations. Importing this module never needs Triton; calling :func:`swiglu` or :func:`geglu`
does (without Triton, or if a launch fails, the op computes the same maths in PyTorch, once
warned).
"""

from __future__ import annotations


import torch

from . import _eager, _guard
from ._triton import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR
from ._triton import tl, triton
from ..settings import triton_interpreting as _interpreting

__all__ = ["swiglu", "geglu", "gated_activation", "is_supported", "ACTIVATIONS"]

ACTIVATIONS = ("silu", "gelu_tanh")
_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_C = 0.044715
_BLOCK = 2048


def is_supported(device, dtype) -> bool:
    if triton is None or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return torch.device(device).type == "cuda" or _interpreting()


if triton is not None:

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit(do_not_specialize=["numel"])  # token counts change every batch: one compile
    def _gated_forward(G, U, Y, numel, GELU: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            t = 2.0 * _sigmoid(2.0 * inner) - 1.0
            act = 0.5 * g * (1.0 + t)
        else:
            act = g * _sigmoid(g)
        tl.store(Y + offsets, (act * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["numel"])
    def _gated_backward(DY, G, U, DG, DU, numel, GELU: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            g2 = g * g
            inner = 0.7978845608028654 * (g + 0.044715 * g2 * g)
            t = 2.0 * _sigmoid(2.0 * inner) - 1.0
            act = 0.5 * g * (1.0 + t)
            dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g2)
        else:
            s = _sigmoid(g)
            act = g * s
            dact = s * (1.0 + g * (1.0 - s))
        tl.store(DG + offsets, (dy * u * dact).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offsets, (dy * act).to(DU.dtype.element_ty), mask=mask)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


KERNEL = "gated activation kernel"


def _forward_triton(gate, up, gelu):
    y = torch.empty_like(gate)
    numel = gate.numel()
    if numel:
        _gated_forward[(triton.cdiv(numel, _BLOCK),)](gate, up, y, numel, GELU=gelu, BLOCK=_BLOCK, num_warps=8)
    return y


def _backward_triton(dy, gate, up, gelu):
    dgate = torch.empty_like(gate)
    dup = torch.empty_like(up)
    numel = gate.numel()
    if numel:
        _gated_backward[(triton.cdiv(numel, _BLOCK),)](
            dy, gate, up, dgate, dup, numel, GELU=gelu, BLOCK=_BLOCK, num_warps=8,
        )
    return dgate, dup


def _activation_and_slope(g, gelu):
    """``act(g)`` and ``act'(g)`` in fp32, as the kernels compute them."""
    if gelu:
        t = torch.tanh(_SQRT_2_OVER_PI * (g + _GELU_C * g * g * g))
        act = 0.5 * g * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * g * g)
        return act, slope
    s = torch.sigmoid(g)
    return g * s, s * (1.0 + g * (1.0 - s))


def _forward_reference(gate, up, gelu):
    act, _ = _activation_and_slope(gate.float(), gelu)
    return (act * up.float()).to(gate.dtype)


def _backward_reference(dy, gate, up, gelu):
    act, slope = _activation_and_slope(gate.float(), gelu)
    dyf = dy.float()
    return (dyf * up.float() * slope).to(gate.dtype), (dyf * act).to(up.dtype)


def _gated_body(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    return _guard.run(KERNEL, _forward_triton, _forward_reference, gate, up, gelu)


_gated_op = torch.library.custom_op("unsloth_patch::gated_activation", _gated_body, mutates_args=())


@_gated_op.register_fake
def _(gate, up, gelu):
    return torch.empty_like(gate)


def _gated_backward_body(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                         gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _guard.run(KERNEL, _backward_triton, _backward_reference, dy, gate, up, gelu)


_gated_backward_op = torch.library.custom_op("unsloth_patch::gated_activation_backward", _gated_backward_body,
                                             mutates_args=())


@_gated_backward_op.register_fake
def _(dy, gate, up, gelu):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    gate, up, gelu = inputs
    ctx.save_for_backward(gate, up)
    ctx.gelu = gelu


def _gated_grad(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _eager.call(_gated_backward_op, _gated_backward_body, _flat(dy), gate, up, ctx.gelu)
    return dgate, dup, None


_gated_op.register_autograd(_gated_grad, setup_context=_setup_context)
_gated_apply = _eager.differentiable(_gated_body, _setup_context, _gated_grad, "GatedActivation")


def _backward_into_triton(dy, gate, up, gelu):
    numel = gate.numel()
    if numel:  # each element is read before it is written: the gradients may overwrite gate and up
        _gated_backward[(triton.cdiv(numel, _BLOCK),)](dy, gate, up, gate, up, numel, GELU=gelu, BLOCK=_BLOCK,
                                                       num_warps=8)
    return gate, up


_REFERENCE_BLOCK = 1 << 16  # elements: the PyTorch references below work on row blocks, fp32 temporaries stay small


def _row_blocks(*tensors):
    rows = [t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1) for t in tensors]
    step = max(1, _REFERENCE_BLOCK // max(1, rows[0].shape[1]))
    for start in range(0, rows[0].shape[0], step):
        yield [r[start:start + step] for r in rows]


def _backward_into_reference(dy, gate, up, gelu):
    for dy_rows, gate_rows, up_rows in _row_blocks(dy, gate, up):
        dgate, dup = _backward_reference(dy_rows, gate_rows, up_rows, gelu)
        gate_rows.copy_(dgate)
        up_rows.copy_(dup)
    return gate, up


def _forward_plain_reference(gate, up, gelu):
    y = torch.empty_like(gate)
    for y_rows, gate_rows, up_rows in _row_blocks(y, gate, up):
        y_rows.copy_(_forward_reference(gate_rows, up_rows, gelu))
    return y


def gated_forward_plain(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """``act(gate) * up`` without autograd (for callers that do their own backward): the kernel where it runs,
    else the same fp32 maths in PyTorch, a block of rows at a time."""
    gate, up = _flat(gate), _flat(up)
    if is_supported(gate.device, gate.dtype):
        return _guard.run(KERNEL, _forward_triton, _forward_plain_reference, gate, up, gelu)
    return _forward_plain_reference(gate, up, gelu)


def gated_backward_into(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool):
    """The gradients of ``act(gate) * up`` written over ``gate`` and ``up`` (contiguous), which are returned as
    ``(dgate, dup)``: no new ``[tokens, intermediate]`` tensors."""
    dy = _flat(dy)
    if is_supported(gate.device, gate.dtype):
        return _guard.run(KERNEL, _backward_into_triton, _backward_into_reference, dy, gate, up, gelu)
    return _backward_into_reference(dy, gate, up, gelu)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` for ``activation`` in :data:`ACTIVATIONS`; same shapes, same dtype."""
    if triton is None:
        raise RuntimeError(f"gated activations need Triton, which failed to import: {_TRITON_IMPORT_ERROR}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {ACTIVATIONS}")
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    if gate.dtype != up.dtype:
        dtype = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(dtype), up.to(dtype)
    return _gated_apply(_gated_op, _flat(gate), _flat(up), activation == "gelu_tanh")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, fused."""
    return gated_activation(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up``, fused."""
    return gated_activation(gate, up, "gelu_tanh")
