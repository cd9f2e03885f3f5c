"""The checkpointing decision: candidates fastest first, the budget, the optimizer state to come, rank agreement.

Pure functions of numbers (the probe's measurements, the card, the toggles), tested without a GPU.
Each candidate that does not fit is kept with its reason (``Decision.rejected``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

POLICIES = ("none", "selective", "mlp_recompute", "offload", "full")  # the index grows with caution (less memory)
# the order candidates are tried in, fastest first as measured: on an H100 (2026-12-07, one call, full FT of the
# 1.1B Llama) ``selective`` ran 25.5k tokens/s at 16.2 GiB where ``mlp_recompute`` ran 34.0k at 9.2 GiB
PREFERENCE = ("none", "mlp_recompute", "selective", "offload", "full")
GIB = 1 << 30
SAFETY_MARGIN = 0.10  # of the card's memory, kept free when no explicit budget is given


# --------------------------------------------------------------------------- the decision


@dataclass
class Decision:
    """What was chosen for one trainer, and the numbers it was chosen from."""

    policy: str  # one of POLICIES
    reason: str
    probed: bool = False  # whether the probe ran (False: the user's setting was left as it is)
    peaks: dict = field(default_factory=dict)  # candidate -> predicted peak bytes (None: did not fit its probe steps)
    rejected: dict = field(default_factory=dict)  # candidate -> why it does not fit (probed candidates only)
    extra_bytes: int = 0  # memory that appears only later in training (optimizer state, DDP buckets)
    budget_bytes: Optional[int] = None  # what peak + extra must stay under
    card_bytes: Optional[int] = None  # the card's total memory (or the env budget on CPU)
    device: str = ""
    tokens: int = 0  # tokens of the probe batch
    local_policy: Optional[str] = None  # this rank's own choice before the ranks agreed
    probe_peak_bytes: Optional[int] = None  # the most the probe's own small steps held at once
    bound_bytes: Optional[int] = None  # upper bound of the no-checkpointing step from the model's shape
    bound_note: str = ""  # why no bound was used (not bounded, or over the budget)
    probe_steps: list = field(default_factory=list)  # each step run: candidate, sequences, predicted, peak bytes, s
    longest: int = 0  # tokens of the probe's sequence: a batch of T tokens is T / longest sequence-equivalents
    chosen_steps: list = field(default_factory=list)  # the chosen candidate's measured steps (estimate.Step)
    seen_sequences: Optional[float] = None  # after train(): the largest batch it drew, in sequence-equivalents
    predicted_seen_bytes: Optional[int] = None  # after train(): the model's peak for that batch, plus the extra
    mlp_chunk: Optional[object] = None  # mlp_chunk.Chunk: the chunked MLPs' token chunk (chunked policies only)
    dense_4bit: Optional[object] = None  # dense_4bit.DenseChoice: 4-bit weights kept dense for the run, or why not
    per_batch: Optional[object] = None  # per_batch.Facts: what each batch may run instead of the plan (None: nothing)
    per_batch_reason: str = ""  # why batches do not choose (when per_batch is None)

    @property
    def changes_training(self) -> bool:
        return self.probed and self.policy != "full"

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = []
        for name in POLICIES:
            if name in self.peaks:
                value = self.peaks[name]
                parts.append(f"{name}={'out of memory' if value is None else gib(value)}")
        probed = ", ".join(parts) if parts else "no probe"
        if self.bound_bytes is not None:
            probed += f"; upper bound without checkpointing: {gib(self.bound_bytes)}"
        rejected = "".join(f"; {name} rejected: {why}" for name, why in self.rejected.items())
        return (f"checkpointing: {self.policy} ({self.reason}); probed peaks: {probed}; "
                f"later extra: {gib(self.extra_bytes)}; budget: {gib(self.budget_bytes)}; "
                f"card: {gib(self.card_bytes)} [{self.device or 'n/a'}]{rejected}"
                f"{'; ' + self.mlp_chunk.reason if self.mlp_chunk is not None else ''}"
                f"{'; ' + self.dense_4bit.reason if self.dense_4bit is not None else ''}"
                f"{'; ' + self.per_batch.reason if self.per_batch is not None else ''}")


_last: Optional[Decision] = None


def last_decision() -> Optional[Decision]:
    """The decision made for the most recent ``Trainer.train`` (None before the first one)."""
    return _last


def remember(decision: Decision) -> None:
    global _last
    _last = decision


class ProbeOutOfMemory(Exception):
    """A candidate did not fit (raised by a measure; a real CUDA OOM is handled the same way)."""


def oom_types() -> tuple:
    types = [ProbeOutOfMemory]
    try:
        import torch

        types.append(torch.cuda.OutOfMemoryError)
    except Exception:  # pragma: no cover
        pass
    return tuple(types)


def is_out_of_memory(exc: BaseException) -> bool:
    """A probe step that did not fit: a CUDA (or the CPU meter's simulated) out-of-memory error, ours, or the host's."""
    return isinstance(exc, oom_types()) or isinstance(exc, MemoryError)


def fits(peak: int, extra: int, budget: int) -> bool:
    """Whether a step (or a batch) of ``peak`` bytes leaves room for the later ``extra`` within ``budget``."""
    return peak + extra <= budget


def gib(nbytes: Optional[int]) -> str:
    return "n/a" if nbytes is None else f"{nbytes / GIB:.2f} GiB"


def _why(exc: BaseException) -> str:
    if isinstance(exc, ProbeOutOfMemory) and str(exc):
        return str(exc)
    first = (str(exc).splitlines() or [""])[0].strip()
    return first[:200] if first else f"ran out of memory ({type(exc).__name__})"


def choose(candidates: Sequence[str], measure: Callable[[str], int], budget: int, extra: int = 0,
           rejected: Optional[dict] = None):
    """Probe ``candidates`` fastest first; return ``(policy, peaks)`` for the first that fits.

    ``measure(name)`` returns the predicted peak bytes of a batch under ``name`` or raises an
    out-of-memory error (``ProbeOutOfMemory`` with the reason, when the probe decided so itself). A
    candidate fits when ``peak + extra <= budget``. Slower candidates are not probed once one fits.
    ``policy`` is None when nothing fits. ``rejected``, when given, receives each probed candidate
    that does not fit, with why.
    """
    peaks: dict = {}
    rejected = {} if rejected is None else rejected
    for name in candidates:
        try:
            peak = int(measure(name))
        except oom_types() as exc:
            peaks[name] = None
            rejected[name] = _why(exc)
            continue
        peaks[name] = peak
        if fits(peak, extra, budget):
            return name, peaks
        rejected[name] = (f"predicted peak {gib(peak)} plus the later extra {gib(extra)} is over the budget "
                          f"{gib(budget)}")
    return None, peaks


def agree(indices: Sequence[int]) -> int:
    """The policy index every rank uses: the most conservative (largest) of the ranks' choices."""
    return max(indices)


def agree_across_ranks(index: int) -> int:
    """``agree`` over the ranks of an initialised ``torch.distributed`` group (MAX all-reduce)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return index
    backend = str(dist.get_backend()).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    value = torch.tensor([index], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def budget_for(card_bytes: Optional[int], env_budget_gb: Optional[float], available_bytes: Optional[int] = None):
    """Bytes the probed peak (plus the later extra) may reach.

    The environment budget, when set, is used as it is. Otherwise the card's memory less a 10%
    safety margin, and never more than what this process can still get (``available_bytes``:
    free memory plus what PyTorch already holds) less the same margin. None: nothing to measure
    against.
    """
    if env_budget_gb is not None:
        return int(env_budget_gb * GIB)
    if card_bytes is None:
        return None
    margin = int(card_bytes * SAFETY_MARGIN)
    usable = card_bytes if available_bytes is None else min(card_bytes, available_bytes)
    return usable - margin


def optimizer_state_bytes(parameters, optim, optimizer_kwargs: Optional[dict] = None) -> int:
    """Memory the optimizer will hold once it has stepped (not there at train start, so not probed).

    ``parameters``: ``(shape, element size)`` of each trainable parameter; ``optimizer_kwargs``: what
    the optimizer is constructed with (``Trainer.get_optimizer_cls_and_kwargs``). Per optimizer family,
    the state torch/transformers/bitsandbytes create for a parameter:
    Adam-style: two moments of the parameter's dtype (plus a scalar step); SGD: a momentum buffer only
    with ``momentum`` > 0; Lion/RMSprop/Adagrad: one buffer; Adafactor (transformers'): fp32 row and
    column second-moment factors for matrices, a full fp32 one otherwise; 8-bit optimizers: two
    one-byte moments plus their block statistics. Unknown optimizers count as Adam-style.
    """
    name = str(getattr(optim, "value", optim) or "").lower()
    arguments = optimizer_kwargs or {}
    total = 0
    for shape, element_size in parameters:
        numel = 1
        for n in shape:
            numel *= int(n)
        if "8bit" in name or ("bnb" in name and "8" in name):
            total += 2 * numel + 2 * 4 * ((numel + 255) // 256)  # one-byte moments + block absmax (fp32)
        elif "adafactor" in name:
            if len(shape) >= 2:
                rows = numel // int(shape[-1])
                cols = numel // int(shape[-2])
                total += 4 * (rows + cols)
            else:
                total += 4 * numel
            total += 4  # the step / RMS scalars
        elif "sgd" in name:
            total += numel * element_size if float(arguments.get("momentum", 0) or 0) > 0 else 0
        elif "lion" in name or "rmsprop" in name or "adagrad" in name:
            total += numel * element_size
        else:
            total += 2 * numel * element_size + 4  # Adam-style, and its step count
    return total
