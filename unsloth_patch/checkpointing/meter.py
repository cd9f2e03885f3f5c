"""The probe's meters: live tensor bytes on a CPU, the allocator's statistics on CUDA, both per phase.

A step is cut into phases at the boundaries the probe marks (``boundary()``: each layer's forward
entry and exit, the arrival of its output's gradient, the start of the backward). Each phase
keeps its own peak, the bytes and the gradient bytes present when it began, and what began it
(``"recompute"``: a layer entered again during the backward, as checkpointing does), so that the
memory model can tell the parts of a step that grow with the batch from the parts that do not,
and one layer's activations from the rest. ``memory_cap`` bounds what the allocator may hold
while the probe runs (CUDA).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

_active: list = []  # the meters of the steps being measured (innermost last)


def boundary(kind: str = "forward") -> None:
    """Mark a phase boundary in the step being measured (nothing when none is); ``kind`` is what begins:
    ``"layer"`` (a layer's forward, in the forward only), ``"recompute"`` (a checkpointed function runs: in
    the backward only, where it recomputes a layer), ``"recomputed"`` (it returned: the layer's backward follows), ``"backward"`` (the backward, or a layer's output
    gradient), ``"forward"`` (anything else). A boundary of its kind outside its half of the step is no
    boundary (module hooks fire again in a recomputation on transformers 4.x, not on 5.x)."""
    if _active:
        _active[-1].end_phase(kind)


class _Phases:
    """Per-phase peaks: ``peak_now()`` / ``reset()`` / ``now()`` come from the meter, ``grads()`` from the probe."""

    grads: Callable[[], int] = staticmethod(lambda: 0)

    def _start_phases(self) -> None:
        self.phases: list = []  # (peak bytes, gradient bytes when the phase began)
        self.starts: list = []  # bytes held when each phase began
        self.kinds: list = []  # what began each phase
        self.end_grads = 0  # gradient bytes when the step ended
        self._backward = False
        self._phase_grads = self.grads()
        self._phase_start = self.now()
        self._phase_kind = "forward"

    def end_phase(self, kind: str = "forward") -> None:
        if (kind == "layer" and self._backward) or (kind in ("recompute", "recomputed") and not self._backward):
            return
        self.phases.append((self.peak_now(), self._phase_grads))
        self.starts.append(self._phase_start)
        self.kinds.append(self._phase_kind)
        self.reset()
        self._backward = self._backward or kind == "backward"
        self._phase_grads = self.end_grads = self.grads()
        self._phase_start = self.now()
        self._phase_kind = kind

    @contextlib.contextmanager
    def _phased(self):
        self._start_phases()
        _active.append(self)
        try:
            yield self
        finally:
            _active.remove(self)
        self.end_phase()


class LiveBytes(_Phases):
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
        self.phase_peak = 0  # the peak since the last phase boundary (<= peak)
        self._paused = 0
        self.phases, self.starts, self.kinds, self.end_grads = [], [], [], 0

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
        # under the phase's peak the true value is too: sweep only when it claims a new peak.
        if self.current <= self.phase_peak:
            return
        self.sweep()
        self.phase_peak = max(self.phase_peak, self.current)
        self.peak = max(self.peak, self.current)
        if self.limit is not None and self.current > self.limit:
            import torch

            raise torch.cuda.OutOfMemoryError(
                f"simulated out of memory: {self.current} bytes live, budget {self.limit} bytes")

    def peak_now(self) -> int:
        self.sweep()
        return max(self.phase_peak, self.current)

    def now(self) -> int:
        self.sweep()
        return self.current

    def reset(self) -> None:
        self.sweep()
        self.phase_peak = self.current

    @contextlib.contextmanager
    def untracked(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def measuring(self, phases: bool = False):
        """Count every operator's outputs; with ``phases``, also cut the step at ``boundary()`` calls."""
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
            with Mode(), (self._phased() if phases else contextlib.nullcontext()):
                yield self
        finally:
            LiveBytes.active = previous


class CudaBytes(_Phases):
    """The same per-phase peaks from the CUDA caching allocator's statistics (no synchronisation needed:
    the allocator accounts for each allocation when it is issued)."""

    def __init__(self, device):
        self.device = device
        self.phases, self.starts, self.kinds, self.end_grads = [], [], [], 0

    def peak_now(self) -> int:
        import torch

        return int(torch.cuda.max_memory_allocated(self.device))

    def now(self) -> int:
        import torch

        return int(torch.cuda.memory_allocated(self.device))

    def reset(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def measuring(self):
        """Per-phase peaks of the step run inside."""
        import torch

        torch.cuda.synchronize(self.device)
        self.reset()
        with self._phased():
            yield self
        torch.cuda.synchronize(self.device)


def _fraction_getter():
    import torch

    return getattr(torch.cuda, "get_per_process_memory_fraction", None)


@contextlib.contextmanager
def memory_cap(device, limit: Optional[int]):
    """While the block runs, the CUDA caching allocator of ``device`` may hold at most ``limit`` bytes
    (``torch.cuda.set_per_process_memory_fraction``; a tighter fraction already set is kept); the previous
    fraction is put back afterwards. An allocation past it raises ``torch.cuda.OutOfMemoryError``, as a
    card of that size would. Nothing on other devices or without a limit.

    The fraction bounds reserved memory (allocated plus cached blocks), so the allocator's cache is
    emptied first and a fragmented step can run out a little before its allocated bytes reach ``limit``.
    """
    import torch

    if limit is None or getattr(device, "type", None) != "cuda":
        yield
        return
    getter = _fraction_getter()
    previous = float(getter(device)) if getter is not None else 1.0
    total = torch.cuda.mem_get_info(device)[1]
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(max(0.0, min(previous, limit / total)), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)
