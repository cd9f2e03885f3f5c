"""Our custom ops, called without the dispatcher where nothing traces them.

Each kernel is a ``torch.library`` custom op with a fake implementation and a registered autograd
formula, so ``torch.compile``, ``torch.export`` and fake-tensor tracing see one opaque operation.
In an eager training step that costs host time: a call goes through the dispatcher, the op's Python
autograd wrapper and a redispatch before it reaches the op's body, about 90 µs a call, forward and
backward, on this project's CPU machine (``benchmarks/op_host_cost.py``), and a decoder layer makes
about ten such calls a step. The reference step is host-bound (``docs/kernel-notes.md``).

:func:`differentiable` builds, from the same body, ``setup_context`` and gradient formula that the
op registers, a plain ``autograd.Function``; :func:`call` picks per call:

* the op itself when ``torch.compile``/``torch.export`` is tracing, a functorch transform or a
  ``TorchDispatchMode`` is active (selective checkpointing's caching modes, a FLOP counter, fake-tensor
  modes: they expect one opaque op, and cannot see a Triton launch), or
  any tensor argument is neither a plain ``torch.Tensor`` nor an ``nn.Parameter`` (fake, functional and
  other subclasses);
* otherwise the body directly (through the ``Function`` where a gradient may be needed).

Both compute the same maths with the same kernels; ``DIRECT = False`` routes every call through the
op (the benchmark's baseline, and a way to rule this path out).
"""

from __future__ import annotations

import torch

DIRECT = True
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a module's weight is a Parameter: plain data, no tracing

_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)  # unknown: assume a mode


def traced(args) -> bool:
    """Whether these arguments need the custom op: something traces, or a tensor is not a plain one."""
    if not DIRECT or torch.compiler.is_compiling() or _functorch_active() or _dispatch_modes():
        return True
    for arg in args:
        if isinstance(arg, torch.Tensor) and type(arg) not in _PLAIN:
            return True
    return False


def call(op, body, *args):
    """``op(*args)`` where tracing needs it, else ``body(*args)``: a call with no autograd of its own."""
    return op(*args) if traced(args) else body(*args)


def differentiable(body, setup_context, gradient, name: str):
    """``apply(op, *args)``: the op where tracing needs it, else ``body`` inside a plain ``autograd.Function``.

    ``setup_context(ctx, inputs, output)`` and ``gradient(ctx, *grads)`` are the functions given to the
    op's ``register_autograd``, so both paths save the same tensors and run the same backward."""

    def forward(ctx, *inputs):
        output = body(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def backward(ctx, *grads):
        return gradient(ctx, *grads)

    function = type(name, (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def apply(op, *args):
        if traced(args):
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return body(*args)

    apply.function = function
    return apply
