"""Live tensor bytes on a CPU, counted as the CUDA allocator would count them (the probe's meter in CI)."""

from __future__ import annotations

import contextlib
from typing import Optional


class LiveBytes:
    """Peak bytes of live tensor storage during a CPU step, as the CUDA allocator would count them.

    Every operator's outputs are seen through a ``TorchDispatchMode`` (forward, backward and
    checkpoint recomputation alike); each new storage is tracked with a weak reference until it
    is freed. Parameters, buffers, gradients and the inputs present at the start are the
    baseline. The peak of the running sum is what ``torch.cuda.max_memory_allocated`` reports
    for the same step, less allocator rounding and kernel workspaces.
    """

    active: Optional["LiveBytes"] = None

    def __init__(self, limit: Optional[int] = None):
        self.limit = limit
        self.live: dict = {}
        self.current = 0
        self.peak = 0
        self._paused = 0

    def track(self, tensor) -> None:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef

        if not isinstance(tensor, torch.Tensor) or self._paused or tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except Exception:
            return
        ref = StorageWeakRef(storage)
        if ref.cdata in self.live:
            return
        nbytes = storage.nbytes()
        self.live[ref.cdata] = (ref, nbytes)
        self.current += nbytes

    def sweep(self) -> None:
        gone = [key for key, (ref, _) in self.live.items() if ref.expired()]
        for key in gone:
            self.current -= self.live.pop(key)[1]

    def check(self) -> None:
        # ``current`` never undercounts (frees are only seen by a sweep), so while it is at or
        # under the peak the true value is too: sweep only when it claims a new peak.
        if self.current <= self.peak:
            return
        self.sweep()
        if self.current > self.peak:
            self.peak = self.current
        if self.limit is not None and self.current > self.limit:
            import torch

            raise torch.cuda.OutOfMemoryError(
                f"simulated out of memory: {self.current} bytes live, budget {self.limit} bytes")

    @contextlib.contextmanager
    def untracked(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def measuring(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for value in tree_flatten(out)[0]:
                    tracker.track(value)
                tracker.check()
                return out

        previous, LiveBytes.active = LiveBytes.active, self
        try:
            with Mode():
                yield self
        finally:
            LiveBytes.active = previous
