"""The checkpoint functions each policy installs on the model's layers, and how they are installed.

``selective``, ``mlp_recompute`` and ``offload`` are ``_gradient_checkpointing_func`` replacements (non-reentrant
``torch.utils.checkpoint``); a failure in either falls back to plain checkpointing for the rest of
the run, once warned.
"""

from __future__ import annotations

import functools
from typing import Optional

from .. import fallback, mlp_recompute
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


class _Offloaded:
    """One saved layer input on the host: the copy's event, and once fetched back, the device copy and its event.

    ``previous`` (weak) is the input saved before it, which the backward needs next: unpacking this one starts
    fetching that one on the copy stream, so its copy runs while this layer is recomputed."""

    __slots__ = ("device", "host", "stored", "fetched", "ready", "used", "requires_grad", "previous", "state",
                 "__weakref__")

    def __init__(self, device, host, stored, requires_grad, previous, state):
        self.device, self.host, self.stored, self.requires_grad = device, host, stored, requires_grad
        self.state = state  # [pinned buffer, event after the last copy that read it]: the pool's
        self.fetched = self.ready = None
        self.used = False  # unpacked once: the backward does not need it again (a retained graph copies it anew)
        self.previous = previous

    def ahead(self, count: int) -> list:
        """The ``count`` inputs saved before this one that the backward has not used yet, nearest first."""
        found, link = [], self.previous
        while link is not None and len(found) < count:
            record = link()
            if record is None:
                break
            if not record.used:
                found.append(record)
            link = record.previous
        return found


_copy_streams: dict = {}
_latest: dict = {}  # device -> weak reference to the most recent _Offloaded on it


def _copy_stream(device):
    import torch

    stream = _copy_streams.get(device)
    if stream is None:
        stream = _copy_streams[device] = torch.cuda.Stream(device)
    return stream


class _PinnedPool:
    """Pinned host buffers kept for the next step: ``cudaHostAlloc`` is slow and synchronises the device, and a
    run's saved inputs change size with every batch. Buffers are bucketed by power-of-two size; one comes back
    when the saved input it held is freed by autograd, and is reused once the copy that read it has finished."""

    def __init__(self):
        self.free: dict = {}  # bucket bytes -> [(uint8 buffer, event of its last read or None)]
        self.allocated = 0  # bytes of pinned memory this pool ever allocated

    @staticmethod
    def bucket(nbytes: int) -> int:
        return 1 << max(20, (max(nbytes, 1) - 1).bit_length())

    def take(self, nbytes: int):
        size = self.bucket(nbytes)
        waiting = self.free.get(size) or []
        for i, (buffer, event) in enumerate(waiting):
            if event is None or event.query():
                del waiting[i]
                return buffer
        self.allocated += size
        return self._allocate(size)

    @staticmethod
    def _allocate(size: int):
        import torch

        return torch.empty(size, dtype=torch.uint8, pin_memory=True)

    def give(self, state: list) -> None:
        buffer, event = state
        self.free.setdefault(buffer.numel(), []).append((buffer, event))


_pool = _PinnedPool()


def _host_copy(tensor):
    """A pinned host tensor shaped like ``tensor`` from the pool, and the pool state to hand back."""
    nbytes = tensor.numel() * tensor.element_size()
    buffer = _pool.take(nbytes)
    host = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
    return host, [buffer, None]


def _offload_pack(tensor):
    import weakref

    import torch

    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type == "cpu":
        tracker = LiveBytes.active
        if tracker is not None and nbytes >= OFFLOAD_MIN_BYTES // 1024:  # CPU probe: moved out of the count
            with tracker.untracked():
                return ("host", tensor.detach().clone())
        return tensor
    if tensor.device.type != "cuda" or nbytes < OFFLOAD_MIN_BYTES or not tensor.is_contiguous():
        return tensor
    device = tensor.device
    stream = _copy_stream(device)
    host, state = _host_copy(tensor)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
        stored = torch.cuda.Event()
        stored.record(stream)
    tensor.record_stream(stream)  # the device memory is reused only after the copy has read it
    record = _Offloaded(device, host, stored, tensor.requires_grad, _latest.get(device), state)
    weakref.finalize(record, _pool.give, state)  # autograd freed the saved input: its buffer serves again
    _latest[device] = weakref.ref(record)
    return record


PREFETCH = 3  # saved inputs fetched ahead: a decoder layer's hidden states and its two rotary tables


def _fetch(record, stream) -> None:
    """Start copying ``record`` back to its device on ``stream`` (once)."""
    import torch

    if record.fetched is not None:
        return
    stream.wait_event(record.stored)
    with torch.cuda.stream(stream):
        record.fetched = record.host.to(record.device, non_blocking=True)
        record.ready = torch.cuda.Event()
        record.ready.record(stream)
    record.state[1] = record.ready


def _offload_unpack(packed):
    import torch

    if isinstance(packed, torch.Tensor):
        return packed
    if isinstance(packed, tuple):  # CPU probe stand-in
        return packed[1]
    current = torch.cuda.current_stream(packed.device)
    if packed.fetched is None:  # not prefetched (the last layer's, or a second backward): copy on this stream
        current.wait_event(packed.stored)
        tensor = packed.host.to(packed.device, non_blocking=True)
        read = torch.cuda.Event()
        read.record(current)
        packed.state[1] = read
    else:
        current.wait_event(packed.ready)
        tensor = packed.fetched
        tensor.record_stream(current)  # allocated on the copy stream, used and freed on this one
        packed.fetched = packed.ready = None
    packed.used = True
    stream = _copy_stream(packed.device)
    for earlier in packed.ahead(PREFETCH):  # the next layer's inputs arrive while this one recomputes
        _fetch(earlier, stream)
    return tensor


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
