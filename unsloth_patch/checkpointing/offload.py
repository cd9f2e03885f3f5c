"""Offloaded checkpoints' host side: saved layer inputs in pinned host memory, copied on a side stream.

``pack`` and ``unpack`` are the ``saved_tensors_hooks`` that ``checkpoint_offload`` scopes to a checkpoint
call, so only the checkpoint's saved inputs (tensors of at least ``OFFLOAD_MIN_BYTES``) leave the device:

* the device-to-host copy runs on a side CUDA stream, after the work that made the tensor, into a buffer
  of a pinned pool kept across steps (``cudaHostAlloc`` is slow and synchronises the device, and a run's
  saved inputs change size with every batch); where memory cannot be pinned (a locked-memory limit), the
  pool hands out pageable buffers, with one warning: the same results, copies that do not overlap;
* in the backward, using one saved input starts copying the nearest unused earlier ones back
  (``PREFETCH``: a decoder layer's hidden states and its two rotary tables), so the next layer's inputs
  arrive while this layer is recomputed;
* a buffer returns to the pool when autograd frees its saved input, and serves again once the copy that
  read it has finished.

On a CPU (the probe's simulated budget) a saved input is cloned outside the live-byte count instead.
"""

from __future__ import annotations

import logging
import weakref

from .. import log
from .meter import LiveBytes

OFFLOAD_MIN_BYTES = 1 << 20  # smaller saved inputs (boundaries, rotary tables) stay on the device


class _Offloaded:
    """One saved layer input on the host: the copy's event, and once fetched back, the device copy and its event.

    ``previous`` (weak) is the input saved before it, which the backward needs next: unpacking this one starts
    fetching that one on the copy stream, so its copy runs while this layer is recomputed."""

    __slots__ = ("device", "host", "stored", "fetched", "ready", "used", "previous", "state", "__weakref__")

    def __init__(self, device, host, stored, previous, state):
        self.device, self.host, self.stored = device, host, stored
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
        self.allocated = 0  # bytes of host memory this pool ever allocated
        self.pageable = None  # why pinning failed, once it has: later buffers are pageable

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
        if self.pageable is None:
            try:
                buffer = self._allocate(size)
            except RuntimeError as exc:  # locked-memory limit, no pinning in a container: pageable from now on
                self.pageable = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                log.once(("offload-pageable",), logging.WARNING,
                         "checkpoint offload: host memory could not be pinned (%s); saved layer inputs go to "
                         "pageable memory, whose copies do not overlap with compute (slower, same results)",
                         self.pageable)
            else:
                self.allocated += size
                return buffer
        self.allocated += size
        return self._allocate_pageable(size)

    @staticmethod
    def _allocate(size: int):
        import torch

        return torch.empty(size, dtype=torch.uint8, pin_memory=True)

    @staticmethod
    def _allocate_pageable(size: int):
        import torch

        return torch.empty(size, dtype=torch.uint8)

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


def pack(tensor):
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
    record = _Offloaded(device, host, stored, _latest.get(device), state)
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


def unpack(packed):
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
