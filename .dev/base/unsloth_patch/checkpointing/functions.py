"""The checkpoint functions each policy installs on the model's layers, and how they are installed.

``selective`` and ``offload`` are ``_gradient_checkpointing_func`` replacements (non-reentrant
``torch.utils.checkpoint``); a failure in either falls back to plain checkpointing for the rest of
the run, once warned.
"""

from __future__ import annotations

import functools
from typing import Optional

from .. import fallback
from .meter import LiveBytes

OFFLOAD_MIN_BYTES = 1 << 20  # smaller saved inputs (boundaries, rotary tables) stay on the device


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
            if fallback.is_out_of_memory(exc):
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


def checkpoint_offload(function, *args, **kwargs):
    """A ``_gradient_checkpointing_func``: plain checkpoint whose saved inputs go to pinned host memory."""
    import torch
    from torch.utils.checkpoint import checkpoint

    kwargs.pop("use_reentrant", None)

    def run():
        with torch.autograd.graph.saved_tensors_hooks(_offload_pack, _offload_unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    return _guarded("offloaded checkpointing", run, function, args, kwargs)


_copy_streams: dict = {}


def _offload_pack(tensor):
    import torch

    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type == "cpu":
        tracker = LiveBytes.active
        if tracker is not None and nbytes >= OFFLOAD_MIN_BYTES // 1024:  # CPU probe: moved out of the count
            with tracker.untracked():
                return ("host", tensor.detach().clone())
        return tensor
    if tensor.device.type != "cuda" or nbytes < OFFLOAD_MIN_BYTES:
        return tensor
    device = tensor.device
    stream = _copy_streams.get(device)
    if stream is None:
        stream = _copy_streams[device] = torch.cuda.Stream(device)
    host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    tensor.record_stream(stream)  # the device memory is reused only after the copy has read it
    return (device, host, done, tensor.requires_grad)


def _offload_unpack(packed):
    import torch

    if isinstance(packed, torch.Tensor):
        return packed
    if packed[0] == "host":  # CPU probe stand-in
        return packed[1]
    device, host, done, _ = packed
    torch.cuda.current_stream(device).wait_event(done)
    return host.to(device, non_blocking=True)


CHECKPOINT_FUNCTIONS = {"selective": checkpoint_selective, "offload": checkpoint_offload}


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
