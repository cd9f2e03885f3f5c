"""The checkpoint functions each policy installs on the model's layers, and how they are installed.

``selective``, ``mlp_recompute`` and ``offload`` are ``_gradient_checkpointing_func`` replacements
(non-reentrant ``torch.utils.checkpoint``); a failure in any of them falls back to plain checkpointing
for the rest of the run, once warned. Offload's host side (the pinned pool, the copies, the prefetch) is
``offload.py``.
"""

from __future__ import annotations

import functools
from typing import Optional

from .. import fallback, mlp_recompute
from .offload import OFFLOAD_MIN_BYTES
from .offload import pack as _offload_pack
from .offload import unpack as _offload_unpack

__all__ = ["OFFLOAD_MIN_BYTES", "CHECKPOINT_FUNCTIONS", "checkpoint_function", "checkpoint_selective",
           "checkpoint_mlp_recompute", "checkpoint_offload", "install", "selective_available", "selective_context",
           "snapshot_checkpointing", "restore_checkpointing", "PerBatch", "layer_of"]


_SAVE_OP_NAMES = (
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_int_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward",
)


@functools.lru_cache(maxsize=1)
def _save_ops() -> tuple:
    import torch

    ops = []
    for name in _SAVE_OP_NAMES:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.append(getattr(packet, "default", packet))
    return tuple(ops)


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _save_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """``context_fn`` for ``torch.utils.checkpoint``: keep matmul/attention outputs, recompute the rest."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


def selective_available() -> bool:
    try:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts  # noqa: F401
    except ImportError:
        return False
    return True


def _guarded(component: str, run, function, args, kwargs):
    """``run()`` unless ``component`` failed before; on failure, TRL's plain checkpoint from now on."""
    from torch.utils.checkpoint import checkpoint

    if fallback.enabled(component):
        try:
            return run()
        except Exception as exc:
            if fallback.propagates(exc):
                raise
            fallback.failed(component, exc, "plain gradient checkpointing")
    return checkpoint(function, *args, use_reentrant=False, **kwargs)


def checkpoint_selective(function, *args, **kwargs):
    """A ``_gradient_checkpointing_func``: non-reentrant checkpoint with the selective policy."""
    from torch.utils.checkpoint import checkpoint

    kwargs.pop("use_reentrant", None)
    kwargs.pop("context_fn", None)
    return _guarded("selective checkpointing", lambda: checkpoint(
        function, *args, use_reentrant=False, context_fn=selective_context, **kwargs), function, args, kwargs)


def checkpoint_mlp_recompute(function, *args, **kwargs):
    """A ``_gradient_checkpointing_func``: plain non-reentrant checkpoint whose eligible MLPs keep only their
    input (``mlp_recompute``); the layer's recomputation in the backward stops before its MLP."""
    from torch.utils.checkpoint import checkpoint

    kwargs.pop("use_reentrant", None)
    return _guarded("MLP-recompute checkpointing", lambda: checkpoint(
        _with_mlp_phase(function), *args, use_reentrant=False, **kwargs), function, args, kwargs)


def checkpoint_offload(function, *args, **kwargs):
    """A ``_gradient_checkpointing_func``: plain checkpoint whose saved inputs go to pinned host memory, and
    whose eligible MLPs keep only their input as under ``mlp_recompute`` (the least a layer can hold)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    kwargs.pop("use_reentrant", None)

    def run():
        with torch.autograd.graph.saved_tensors_hooks(_offload_pack, _offload_unpack):
            return checkpoint(_with_mlp_phase(function), *args, use_reentrant=False, **kwargs)

    return _guarded("offloaded checkpointing", run, function, args, kwargs)


def _with_mlp_phase(function):
    """``function`` run inside ``mlp_recompute.layer_call``: its first call is the forward, later ones recompute."""
    calls = []

    def layer(*inner, **named):
        recomputing = bool(calls)
        calls.append(None)
        with mlp_recompute.layer_call(recomputing):
            return function(*inner, **named)

    return layer


CHECKPOINT_FUNCTIONS = {"selective": checkpoint_selective, "mlp_recompute": checkpoint_mlp_recompute,
                        "offload": checkpoint_offload}


def _plain_checkpoint(kwargs: dict):
    from torch.utils.checkpoint import checkpoint

    kwargs = dict(kwargs)
    kwargs.setdefault("use_reentrant", False)
    return functools.partial(checkpoint, **kwargs)


def checkpoint_function(policy: str, kwargs: Optional[dict] = None):
    """The function installed as ``_gradient_checkpointing_func`` for ``policy`` (None for ``none``)."""
    kwargs = {k: v for k, v in (kwargs or {}).items() if k not in ("every_n_layers", "offload", "selective")}
    if policy == "none":
        return None
    if policy == "full":
        return _plain_checkpoint(kwargs)
    extra = {k: v for k, v in kwargs.items() if k not in ("use_reentrant", "context_fn")}
    return functools.partial(CHECKPOINT_FUNCTIONS[policy], **extra) if extra else CHECKPOINT_FUNCTIONS[policy]


_CHECKPOINT_OPTIONS = ("use_reentrant", "context_fn", "preserve_rng_state", "determinism_check", "debug", "early_stop")


def layer_of(function):
    """The module a checkpointed call runs: transformers passes the layer's bound ``__call__`` (4.x), a
    ``partial`` of it, or ``partial(forward, layer, **kwargs)`` (5.x); None when it cannot tell."""
    while isinstance(function, functools.partial):
        if function.args and hasattr(function.args[0], "_modules"):  # an nn.Module passed as ``self``
            return function.args[0]
        function = function.func
    return getattr(function, "__self__", None)


class PerBatch:
    """The ``_gradient_checkpointing_func`` of a run whose batches choose their own policy
    (``per_batch.py``): each layer call runs under the current batch's checkpoint function, or
    unchecked (a plain call) when the batch runs no checkpointing or the layer is one of the
    batch's unchecked layers."""

    def __init__(self, functions: dict, policy: str):
        self.functions = functions  # policy -> its checkpoint function (None: no checkpointing)
        self.policy = policy
        self.unchecked: frozenset = frozenset()  # ids of the layers this batch runs without checkpointing

    def set(self, policy: str, unchecked=()) -> None:
        self.policy = policy
        self.unchecked = frozenset(unchecked)

    def __call__(self, function, *args, **kwargs):
        run = self.functions.get(self.policy)
        if run is None or (self.unchecked and id(layer_of(function)) in self.unchecked):
            for name in _CHECKPOINT_OPTIONS:
                kwargs.pop(name, None)
            return function(*args, **kwargs)
        return run(function, *args, **kwargs)


def snapshot_checkpointing(model) -> list:
    """Every module's checkpointing attributes, to put back exactly with ``restore_checkpointing``."""
    missing = object()
    saved = []
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            saved.append((module, module.__dict__.get("gradient_checkpointing", missing),
                          module.__dict__.get("_gradient_checkpointing_func", missing)))
    return [(m, g, f, missing) for m, g, f in saved]


def restore_checkpointing(saved: list) -> None:
    for module, flag, func, missing in saved:
        for name, value in (("gradient_checkpointing", flag), ("_gradient_checkpointing_func", func)):
            if value is missing:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


def install(model, policy: str, kwargs: Optional[dict] = None) -> int:
    """Switch every checkpointable module of ``model`` to ``policy``; return how many were set.

    The same attributes transformers' own ``gradient_checkpointing_enable`` sets (4.46 to 5.x):
    ``gradient_checkpointing`` and ``_gradient_checkpointing_func`` on each module that has the
    flag; the layers read them in their forward.
    """
    func = checkpoint_function(policy, kwargs)
    count = 0
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = func is not None
            if func is not None:
                module._gradient_checkpointing_func = func
            count += 1
    return count
