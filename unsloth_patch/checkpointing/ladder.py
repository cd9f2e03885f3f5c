"""Which probe steps run: the smallest first, each predicted before it runs and skipped when it would not fit.

Full checkpointing holds the least a step can (the saved layer inputs and one recomputed layer), so
its smallest steps run first, as the anchor the other candidates' first steps are predicted from;
then ``policy.choose`` asks for the candidates fastest first, and each climbs steps of 1, 2, then 4
sequences (``estimate.step_sizes``), starting at 2 when full's steps predict that one to fit (the
smaller step would only guard it). Before a step runs, its peak is predicted from what is already
measured:

* from the candidate's own smaller steps, once it has one (``estimate.own``: phase by phase);
* ``none``'s and ``selective``'s first step: full's step of that size plus every layer's
  activations (``estimate.kept``: one recomputed layer's rise in full's steps, times the layers).
  Before that step, their whole batch is predicted the same way; when half of it (the prediction
  errs high, ``KEPT_ERRS_HIGH``) plus the later extra is still over the budget, they run no step;
  ``selective`` keeps a part of them, so it is also predicted at no more than ``none``'s measured
  step of that size;
* ``offload``'s first step: full's step of that size (it holds less: its saved inputs are on the host);
* full's first step: the model and a gradient for each trainable parameter (``probe.floor_bytes``),
  the least a training step holds.

A step whose prediction is over the budget is not run, nor one smaller than the batch whose
prediction leaves no room for the later extra (the optimizer state: the batch holds more than the
step, so it could not fit either); its candidate is rejected with why. So is a candidate whose step
ran out of memory (the CPU meter's simulated error; on CUDA the allocator's cap, ``meter.memory_cap``,
turns an under-prediction into such a caught error) or held more than fits. ``none`` and
``selective`` hold at least what full (and ``mlp_recompute``) holds, so they are rejected when either is. The steps run, with
their predictions and peaks, are kept in ``records``.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from . import estimate
from .policy import ProbeOutOfMemory, fits, gib, is_out_of_memory
from .probe import ProbeBatch

ANCHOR = "full"
KEEP_LAYERS = ("none", "selective")  # hold every layer's activations, or a part of them: at least what full holds
AT_MOST = {"selective": "none"}  # a step holds no more than that candidate's step of the same size
# full's step with every layer's activations kept errs high, by up to 1.5x on the GPU (2026-12-07: a 2-sequence
# step predicted at 10.79 GiB held 7.45; a batch of 8 predicted at about 31 GiB held 21.6). A candidate whose batch
# stays over the budget at half that prediction is rejected before it runs a step: its steps would hold far more
# than the policy finally chosen needs (a LoRA run on a 16 GB card held 11.88 GiB in the probe, 3.3 in training)
KEPT_ERRS_HIGH = 2.0


class Ladder:
    """The probe's steps over every candidate, for one batch ``spec`` (``probe.ProbeBatch``).

    ``run(name, batch)`` measures one step (``probe.measure(..., phases=True)``: an ``estimate.Step``)
    or raises an out-of-memory error; ``release()`` frees what a step that ran out of memory left.
    ``peak(name)`` is the measure ``policy.choose`` calls.
    """

    def __init__(self, spec: ProbeBatch, run: Callable, budget: int, extra: int = 0, floor: int = 0,
                 release: Optional[Callable[[], None]] = None):
        self.spec = spec
        self.count = len(spec.lengths)
        self.sizes = estimate.step_sizes(self.count)
        self.run = run
        self.budget, self.extra, self.floor = budget, extra, floor
        self.release = release or (lambda: None)
        self.steps: dict = {}  # candidate -> its measured steps, smallest first
        self.failed: dict = {}  # candidate -> why it does not fit
        # each step run: candidate, sequences, predicted and peak bytes (None: out of memory), and its wall time in
        # seconds (the step, restoring the model and freeing what it left: where a probe's start-up goes), split
        # into its parts ("parts": prepare, step, restore) when it did not run out of memory
        self.records: list = []

    def peak(self, name: str) -> int:
        """The predicted peak of the whole batch under ``name``; ``ProbeOutOfMemory`` with the reason when it
        does not fit (some of its steps were then not run)."""
        if name != ANCHOR:
            self._climb(ANCHOR, upto=2)
            for less in (ANCHOR, "mlp_recompute"):  # each holds at most what a layer-keeping candidate holds
                if name in KEEP_LAYERS and name not in self.failed and self._does_not_fit(less):
                    self.failed[name] = f"it holds at least what {less} checkpointing holds, which does not fit"
        self._climb(name)
        if name in self.failed:
            raise ProbeOutOfMemory(self.failed[name])
        return estimate.batch_peak(self.steps[name], self.count)

    def _does_not_fit(self, name: str) -> bool:
        """Whether ``name`` is known not to fit: a step of it did not, or (``mlp_recompute``, tried before the
        layer-keeping ``selective``) its measured steps put the batch over the budget with the later extra."""
        if name in self.failed:
            return True
        steps = self.steps.get(name)
        return (name != ANCHOR and bool(steps)
                and not fits(estimate.batch_peak(steps, self.count), self.extra, self.budget))

    def predict(self, name: str, size: int):
        """``(bytes, basis)``: the peak predicted for ``name``'s step of ``size`` sequences, and what from."""
        mine = self.steps.get(name)
        if mine:
            done = "+".join(str(s.sequences) for s in mine)
            return estimate.own(mine, size), f"from its {done}-sequence step{'s' if len(mine) > 1 else ''}"
        anchor = self.steps.get(ANCHOR)
        if name == ANCHOR or not anchor:
            return self.floor, "the model and a gradient for each trainable parameter"
        if name in KEEP_LAYERS:
            kept = estimate.kept(anchor, size)
            if kept is not None:
                basis = f"{ANCHOR} checkpointing's step with every layer's activations kept"
                bound = self.steps.get(AT_MOST.get(name, ""))
                if bound and estimate.own(bound, size) < kept:
                    return estimate.own(bound, size), f"no more than {AT_MOST[name]}'s step of that size"
                return kept, basis
        return estimate.own(anchor, size), f"{ANCHOR} checkpointing's step of that size"

    def _climb(self, name: str, upto: Optional[int] = None) -> None:
        if name in KEEP_LAYERS and name not in self.failed and not self.steps.get(name) and self.steps.get(ANCHOR):
            predicted, basis = self.predict(name, self.count)
            if not fits(int(predicted / KEPT_ERRS_HIGH), self.extra, self.budget):
                self.failed[name] = (f"its batch is predicted at {gib(predicted)} ({basis}); at 1/{KEPT_ERRS_HIGH:g} "
                                     f"of that it is still over the budget {gib(self.budget)} with the later extra "
                                     f"{gib(self.extra)}; not run")
                return
        sizes = [n for n in self.sizes if upto is None or n <= upto]
        if name != ANCHOR and not self.steps.get(name) and self.steps.get(ANCHOR):
            # predicted from full's steps, the first step is the largest of up to two sequences that fits
            first = [n for n in sizes if n <= 2]
            fitting = [n for n in first if self._allowed(name, n)[0]]
            sizes = sizes[sizes.index(fitting[-1]):] if fitting else first[:1]
        for size in sizes:
            if name in self.failed:
                return
            if any(s.sequences == size for s in self.steps.get(name, ())):
                continue
            allowed, predicted, why = self._allowed(name, size)
            if not allowed:
                self.failed[name] = why
                return
            self._measure(name, size, predicted)

    def _allowed(self, name: str, size: int):
        """``(may run, predicted bytes, why not)`` for ``name``'s step of ``size`` sequences. The batch's own step
        must fit the memory; a smaller one must leave room for the optimizer state too, or the batch, which
        holds more, cannot fit."""
        predicted, basis = self.predict(name, size)
        room = 0 if size == self.count else self.extra
        if fits(predicted, room, self.budget):
            return True, predicted, ""
        later = f" with the later extra {gib(self.extra)}" if room else ""
        return False, predicted, (f"its {size}-sequence probe step is predicted at {gib(predicted)} ({basis}), "
                                  f"over the budget {gib(self.budget)}{later}; not run")

    def _batch(self, size: int) -> ProbeBatch:
        if size == self.count:
            return self.spec
        return ProbeBatch([max(self.spec.lengths)] * size, self.spec.flat)

    def _measure(self, name: str, size: int, predicted: int) -> None:
        record = {"candidate": name, "sequences": size, "predicted": int(predicted), "peak": None, "seconds": None}
        self.records.append(record)
        failure = None
        started = time.perf_counter()
        try:
            step = self.run(name, self._batch(size))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            first = (str(exc).splitlines() or [""])[0][:160]
            failure = f"its {size}-sequence probe step ran out of memory ({type(exc).__name__}: {first})"
        finally:
            record["seconds"] = round(time.perf_counter() - started, 4)
        if failure is not None:  # the error and its frames are gone now: free what they held
            self.release()
            self.failed[name] = failure
            return
        record["peak"] = step.peak
        if step.seconds:  # where the step's wall time went: preparing, the step, putting back and freeing
            record["parts"] = dict(zip(("prepare", "step", "restore"), step.seconds))
        self.steps.setdefault(name, []).append(step)
        if not fits(step.peak, self.extra, self.budget):
            self.failed[name] = (f"its {size}-sequence probe step held {gib(step.peak)}, over the budget "
                                 f"{gib(self.budget)} with the later extra {gib(self.extra)}")
