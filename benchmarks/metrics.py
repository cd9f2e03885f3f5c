"""How one ``trainer.train()`` is measured: wall-clock of the whole call, real tokens per step.

Whole-run throughput is real (non-pad) tokens over the wall-clock time from the call of
``trainer.train()`` to its return — everything a user waits for: our checkpointing probe, Triton
compilation, warm-up, dataloader start, the steps. ``train_runtime`` (transformers' own clock, which
starts after our probe) is kept as an extra figure only. Steady state is the tokens of the steps
after the first 10% over the wall-clock time from the start of the first of them to the end of the
last: the host work between steps (the next batch, logging, callbacks) is part of training and is
in it. (Until 2026-12-07 the steady figure divided by the sum of the steps' own durations, which
left that work out, about 4 ms a step on the reference workload; ``tokens_per_s_steady_steps``
keeps that figure for comparisons with older results.)

Tokens are counted from the batches the trainer really trains on, for any trainer class (stock,
peers, ours): the instance's ``training_step`` is wrapped to count each micro-batch's real tokens.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from dataclasses import asdict, dataclass


def _real_tokens(batch) -> int:
    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


@dataclass
class RunTimes:
    wall_s: float  # trainer.train(), call to return
    train_runtime_s: float  # transformers' own clock
    startup_s: float  # from the call to the first step's start (probe, plan, dataloader, ...)
    steps: int
    tokens: int
    steady_tokens: int
    steady_s: float  # wall-clock from the start of the first steady step to the end of the last step
    first_steps_s: float  # the first 10% of steps (compilation, warm-up)
    steady_steps_s: float = 0.0  # the steady steps' own durations only (the figure used until 2026-12-07)

    @property
    def tokens_per_s_whole(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_s_train_runtime(self) -> float:
        return self.tokens / self.train_runtime_s if self.train_runtime_s else 0.0

    @property
    def tokens_per_s_steady(self):
        return self.steady_tokens / self.steady_s if self.steady_s else None

    @property
    def tokens_per_s_steady_steps(self):
        return self.steady_tokens / self.steady_steps_s if self.steady_steps_s else None

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(tokens_per_s_whole=self.tokens_per_s_whole, tokens_per_s_steady=self.tokens_per_s_steady,
                   tokens_per_s_train_runtime=self.tokens_per_s_train_runtime,
                   tokens_per_s_steady_steps=self.tokens_per_s_steady_steps)
        return out


_EARLY_STEPS = 5


def first_steady_step(steps: int) -> int:
    """Index of the first step counted in steady state: the first 10% of the steps (at least one) are not."""
    return max(1, steps // 10) if steps > 1 else 0


def tokens_per_s_median_step(step_s, steady_tokens: int):
    """Steady tokens per step over the median steady step's duration: the pace of a typical step, without the
    few long ones (a peer's recompilations, a collection). Beside the steady figure, never instead of it: a
    user waits for the long steps too. None without per-step times."""
    if not step_s or not steady_tokens:
        return None
    steady = step_s[first_steady_step(len(step_s)):]
    if not steady:
        return None
    median = statistics.median(steady)
    return (steady_tokens / len(steady)) / median if median > 0 else None


class RunMeter:
    """Attach to a built trainer, then ``meter.train()`` in place of ``trainer.train()``."""

    def __init__(self, trainer, synchronize=None):
        from transformers import TrainerCallback

        self.trainer = trainer
        self.synchronize = synchronize or _synchronizer()
        self.step_times: list = []
        self.micro_tokens: list = []
        self.early_allocs: list = []  # the CUDA allocator's device allocations by the end of each of the first steps
        meter = self

        class _Steps(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                meter.synchronize()
                meter.step_times.append([time.perf_counter(), None])

            def on_step_end(self, *args, **kwargs):
                meter.synchronize()
                meter.step_times[-1][1] = time.perf_counter()
                if len(meter.step_times) <= _EARLY_STEPS:
                    stats = _Watch._allocator()
                    if stats is not None:
                        meter.early_allocs.append(stats["num_device_alloc"])

        trainer.add_callback(_Steps())
        step = trainer.training_step

        def counting_step(model, inputs, *args, **kwargs):
            meter.micro_tokens.append(_real_tokens(inputs))
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = counting_step

    def train(self, **kwargs):
        self.synchronize()
        watch = _Watch()
        start = time.perf_counter()
        with watch:
            output = self.trainer.train(**kwargs)
            self.synchronize()
        self.wall_s = time.perf_counter() - start
        self.start = start
        self.watch = watch
        return output

    def diagnostics(self) -> dict:
        """Where a step's time may go besides the GPU's work: each step's duration, the host time between
        steps (data, logging), garbage collections, Triton compilations and CUDA allocator calls during
        ``train()``, each stamped in seconds from its start, so a slow run shows whether it was slow
        throughout or in a few events."""
        out = {"step_s": [round(b - a, 5) for a, b in self.step_times if b is not None],
               "between_steps_s": [round(n[0] - p[1], 5) for p, n in zip(self.step_times, self.step_times[1:])
                                   if p[1] is not None]}
        out.update(self.watch.report(self.start))
        alloc = self.watch.alloc_before()
        if self.early_allocs and alloc is not None:  # cudaMalloc calls in each of the first steps (step 0: from train())
            counts = [alloc] + self.early_allocs
            out["early_step_device_allocs"] = [b - a for a, b in zip(counts, counts[1:])]
        return out

    def times(self, output) -> RunTimes:
        steps = len(self.step_times)
        micro = max(1, int(getattr(self.trainer.args, "gradient_accumulation_steps", 1) or 1))
        skip = first_steady_step(steps)
        done = [(a, b) for a, b in self.step_times if b is not None]
        return RunTimes(
            wall_s=self.wall_s,
            train_runtime_s=float(output.metrics.get("train_runtime", self.wall_s)),
            startup_s=(self.step_times[0][0] - self.start) if self.step_times else self.wall_s,
            steps=steps,
            tokens=sum(self.micro_tokens[:steps * micro]),
            steady_tokens=sum(self.micro_tokens[skip * micro:steps * micro]),
            steady_s=(done[-1][1] - done[skip][0]) if len(done) > skip else 0.0,
            first_steps_s=sum(b - a for a, b in done[:skip]),
            steady_steps_s=sum(b - a for a, b in done[skip:]),
        )


def _synchronizer():
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.synchronize
    except Exception:  # pragma: no cover
        pass
    return lambda: None


class _Watch:
    """Garbage collections (``gc.callbacks``), Triton compilations (``triton.knobs.runtime.
    jit_post_compile_hook``, chained to any hook already set) and the CUDA caching allocator's device
    calls while the block runs. Each part is left out where the installed version lacks it."""

    def __init__(self):
        self.collections = []  # (start, seconds, generation, objects frozen at its start, collected, thread)
        self.compiles = []  # (time, kernel)
        self._gc_start = None
        self._knobs = None
        self._previous_hook = None
        self._alloc_before = None
        self._alloc = None  # the allocator's calls during the block, set on exit

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            now = time.perf_counter()
            # whether older objects were frozen (``gc.freeze``) and on which thread: a full collection that
            # costs as much frozen as not says its time goes elsewhere than the frozen objects
            self.collections.append((self._gc_start, now - self._gc_start, info.get("generation"),
                                     gc.get_freeze_count(), info.get("collected"), threading.current_thread().name))
            self._gc_start = None

    def _on_compile(self, *args, **kwargs):
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or getattr(getattr(fn, "fn", None), "__name__", None) or "?"
        self.compiles.append((time.perf_counter(), str(name)))
        if self._previous_hook is not None:
            return self._previous_hook(*args, **kwargs)
        return None

    @staticmethod
    def _allocator():
        try:
            import torch

            if not torch.cuda.is_available():
                return None
            stats = torch.cuda.memory_stats()
            return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries",
                                                    "num_sync_all_streams")}
        except Exception:
            return None

    def __enter__(self):
        gc.callbacks.append(self._on_gc)
        try:
            from triton import knobs

            self._knobs = knobs
            self._previous_hook = knobs.runtime.jit_post_compile_hook
            knobs.runtime.jit_post_compile_hook = self._on_compile
        except Exception:
            self._knobs = None
        self._alloc_before = self._allocator()
        return self

    def alloc_before(self):
        """The allocator's device allocations when ``train()`` was called (None off a GPU)."""
        return (self._alloc_before or {}).get("num_device_alloc")

    def __exit__(self, *exc):
        gc.callbacks.remove(self._on_gc)
        if self._knobs is not None:
            self._knobs.runtime.jit_post_compile_hook = self._previous_hook
        after = self._allocator()
        self._alloc = ({k: after[k] - self._alloc_before.get(k, 0) for k in after}
                       if after is not None and self._alloc_before is not None else None)
        return False

    def report(self, start: float) -> dict:
        return {"gc": [(round(t - start, 4), round(d, 5), *rest) for t, d, *rest in self.collections],
                "gc_s": round(sum(d for _, d, *_ in self.collections), 5),
                "triton_compiles": [(round(t - start, 4), name) for t, name in self.compiles]
                if self._knobs is not None else None,
                "allocator": self._alloc}
