"""How one ``trainer.train()`` is measured: wall-clock of the whole call, real tokens per step.

Whole-run throughput is real (non-pad) tokens over the wall-clock time from the call of
``trainer.train()`` to its return — everything a user waits for: our checkpointing probe, Triton
compilation, warm-up, dataloader start, the steps. ``train_runtime`` (transformers' own clock, which
starts after our probe) is kept as an extra figure only. Steady state is tokens over time of the
steps after the first 10%.

Tokens are counted from the batches the trainer really trains on, for any trainer class (stock,
peers, ours): the instance's ``training_step`` is wrapped to count each micro-batch's real tokens.
"""

from __future__ import annotations

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
    steady_s: float
    first_steps_s: float  # the first 10% of steps (compilation, warm-up)

    @property
    def tokens_per_s_whole(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_s_train_runtime(self) -> float:
        return self.tokens / self.train_runtime_s if self.train_runtime_s else 0.0

    @property
    def tokens_per_s_steady(self):
        return self.steady_tokens / self.steady_s if self.steady_s else None

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(tokens_per_s_whole=self.tokens_per_s_whole, tokens_per_s_steady=self.tokens_per_s_steady,
                   tokens_per_s_train_runtime=self.tokens_per_s_train_runtime)
        return out


class RunMeter:
    """Attach to a built trainer, then ``meter.train()`` in place of ``trainer.train()``."""

    def __init__(self, trainer, synchronize=None):
        from transformers import TrainerCallback

        self.trainer = trainer
        self.synchronize = synchronize or _synchronizer()
        self.step_times: list = []
        self.micro_tokens: list = []
        meter = self

        class _Steps(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                meter.synchronize()
                meter.step_times.append([time.perf_counter(), None])

            def on_step_end(self, *args, **kwargs):
                meter.synchronize()
                meter.step_times[-1][1] = time.perf_counter()

        trainer.add_callback(_Steps())
        step = trainer.training_step

        def counting_step(model, inputs, *args, **kwargs):
            meter.micro_tokens.append(_real_tokens(inputs))
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = counting_step

    def train(self, **kwargs):
        self.synchronize()
        start = time.perf_counter()
        output = self.trainer.train(**kwargs)
        self.synchronize()
        self.wall_s = time.perf_counter() - start
        self.start = start
        return output

    def times(self, output) -> RunTimes:
        steps = len(self.step_times)
        micro = max(1, int(getattr(self.trainer.args, "gradient_accumulation_steps", 1) or 1))
        skip = max(1, steps // 10) if steps > 1 else 0
        done = [(a, b) for a, b in self.step_times if b is not None]
        return RunTimes(
            wall_s=self.wall_s,
            train_runtime_s=float(output.metrics.get("train_runtime", self.wall_s)),
            startup_s=(self.step_times[0][0] - self.start) if self.step_times else self.wall_s,
            steps=steps,
            tokens=sum(self.micro_tokens[:steps * micro]),
            steady_tokens=sum(self.micro_tokens[skip * micro:steps * micro]),
            steady_s=sum(b - a for a, b in done[skip:]),
            first_steps_s=sum(b - a for a, b in done[:skip]),
        )


def _synchronizer():
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.synchronize
    except Exception:  # pragma: no cover
        pass
    return lambda: None
