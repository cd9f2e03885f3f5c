"""Activation checkpointing policy: the cheapest one that fits, chosen from a measurement.

TRL (>= 0.24) turns gradient checkpointing on by default. When it is on only because of that
default, the trainer start runs one forward+backward on the largest batch the run can produce
under each candidate policy, fastest first, and keeps the first whose peak memory (plus the
optimizer state still to come) fits the budget:

``none``       no checkpointing: every activation is kept.
``selective``  checkpointed layers keep matmul and attention outputs and recompute the cheap
               elementwise / normalisation work (PyTorch selective activation checkpointing).
``offload``    plain checkpointing whose saved layer inputs live in pinned host memory; the
               device-to-host copies run on a side stream, overlapped with compute.
``full``       TRL's default: plain checkpointing.

This module holds the policy (pure functions, tested without a GPU), the memory measure, the
checkpoint functions the policies install, and the probe. ``patches/checkpointing.py`` wires it
into ``Trainer.train``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from . import fallback

POLICIES = ("none", "selective", "offload", "full")  # fastest first; the index grows with caution
GIB = 1 << 30
SAFETY_MARGIN = 0.10  # of the card's memory, kept free when no explicit budget is given
OFFLOAD_MIN_BYTES = 1 << 20  # smaller saved inputs (boundaries, rotary tables) stay on the device


# --------------------------------------------------------------------------- the decision


@dataclass
class Decision:
    """What was chosen for one trainer, and the numbers it was chosen from."""

    policy: str  # one of POLICIES
    reason: str
    probed: bool = False  # whether the probe ran (False: the user's setting was left as it is)
    peaks: dict = field(default_factory=dict)  # candidate -> probed peak bytes (None: ran out of memory)
    extra_bytes: int = 0  # memory that appears only later in training (optimizer state, DDP buckets)
    budget_bytes: Optional[int] = None  # what peak + extra must stay under
    card_bytes: Optional[int] = None  # the card's total memory (or the env budget on CPU)
    device: str = ""
    tokens: int = 0  # tokens of the probe batch
    local_policy: Optional[str] = None  # this rank's own choice before the ranks agreed
    probe_peak_bytes: Optional[int] = None  # the most the probe's own small steps held at once

    @property
    def changes_training(self) -> bool:
        return self.probed and self.policy != "full"

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def gib(n):
            return "n/a" if n is None else f"{n / GIB:.2f} GiB"

        parts = []
        for name in POLICIES:
            if name in self.peaks:
                value = self.peaks[name]
                parts.append(f"{name}={'out of memory' if value is None else gib(value)}")
        probed = ", ".join(parts) if parts else "no probe"
        return (f"checkpointing: {self.policy} ({self.reason}); probed peaks: {probed}; "
                f"later extra: {gib(self.extra_bytes)}; budget: {gib(self.budget_bytes)}; "
                f"card: {gib(self.card_bytes)} [{self.device or 'n/a'}]")


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


def choose(candidates: Sequence[str], measure: Callable[[str], int], budget: int, extra: int = 0):
    """Probe ``candidates`` fastest first; return ``(policy, peaks)`` for the first that fits.

    ``measure(name)`` returns the peak bytes of one step under ``name`` or raises an
    out-of-memory error. A candidate fits when ``peak + extra <= budget``. Slower candidates are
    not probed once one fits. ``policy`` is None when nothing fits.
    """
    peaks: dict = {}
    for name in candidates:
        try:
            peak = int(measure(name))
        except oom_types():
            peaks[name] = None
            continue
        peaks[name] = peak
        if peak + extra <= budget:
            return name, peaks
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


def optimizer_state_bytes(parameters, optim, optim_args: str = "") -> int:
    """Memory the optimizer will hold once it has stepped (not there at train start, so not probed).

    ``parameters``: ``(shape, element size)`` of each trainable parameter. Per optimizer family, the
    state torch/transformers/bitsandbytes create for a parameter:
    Adam-style: two moments of the parameter's dtype (plus a scalar step); SGD: a momentum buffer only
    with ``momentum`` > 0; Lion/RMSprop/Adagrad: one buffer; Adafactor (transformers'): fp32 row and
    column second-moment factors for matrices, a full fp32 one otherwise; 8-bit optimizers: two
    one-byte moments plus their block statistics. Unknown optimizers count as Adam-style.
    """
    name = str(getattr(optim, "value", optim) or "").lower()
    arguments = _optim_arguments(optim_args)
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


def _optim_arguments(text: str) -> dict:
    """transformers' ``optim_args`` string ("momentum=0.9,nesterov=True") as a dict."""
    out = {}
    for part in (text or "").replace(" ", "").split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key] = value
    return out


# --------------------------------------------------------------------------- checkpoint functions

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
        tracker = _LiveBytes.active
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


# --------------------------------------------------------------------------- memory measures


class _LiveBytes:
    """Peak bytes of live tensor storage during a CPU step, as the CUDA allocator would count them.

    Every operator's outputs are seen through a ``TorchDispatchMode`` (forward, backward and
    checkpoint recomputation alike); each new storage is tracked with a weak reference until it
    is freed. Parameters, buffers, gradients and the inputs present at the start are the
    baseline. The peak of the running sum is what ``torch.cuda.max_memory_allocated`` reports
    for the same step, less allocator rounding and kernel workspaces.
    """

    active: Optional["_LiveBytes"] = None

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

        previous, _LiveBytes.active = _LiveBytes.active, self
        try:
            with Mode():
                yield self
        finally:
            _LiveBytes.active = previous


# --------------------------------------------------------------------------- the probe


@dataclass
class ProbeBatch:
    lengths: list  # sequence lengths of the largest batch
    flat: bool  # padding-free: one row with position_ids restarting per sequence


def make_batch(spec: ProbeBatch, vocab_size: int, device, seed: int = 0) -> dict:
    """Random-token batch of ``spec``'s shape; its own generator leaves the global RNG untouched."""
    import torch

    from .collate import boundaries_from_lengths

    generator = torch.Generator().manual_seed(seed)
    total = sum(spec.lengths)
    if spec.flat:
        ids = torch.randint(0, vocab_size, (1, total), generator=generator)
        positions = torch.cat([torch.arange(n) for n in spec.lengths]).unsqueeze(0)
        labels = ids.clone()
        starts = boundaries_from_lengths(spec.lengths)["cu_seq_lens_q"][:-1].long()
        labels[0, starts] = -100
        batch = {"input_ids": ids, "position_ids": positions, "labels": labels}
        batch.update(boundaries_from_lengths(spec.lengths))
    else:
        rows, width = len(spec.lengths), max(spec.lengths)
        ids = torch.randint(0, vocab_size, (rows, width), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@dataclass
class RestorePoint:
    """Everything a probe step may touch, to put back exactly.

    Hooks and flags that transformers installs on a model's first forward (the output-capturing
    hooks of MoE routers, say) are left in place: the first real forward must find the model
    as a first forward leaves it, or transformers believes them installed while they are gone.
    """

    grads: list
    buffers: list
    training: list
    checkpointing: list
    rng: dict

    @classmethod
    def take(cls, model) -> "RestorePoint":
        import torch

        grads = [(p, p.grad) for p in model.parameters()]
        buffers = []
        for module in model.modules():
            buffers.append((module, dict(module._buffers),
                            {k: v.detach().clone() for k, v in module._buffers.items() if v is not None}))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        try:
            import numpy

            rng["numpy"] = numpy.random.get_state()
        except ImportError:  # pragma: no cover
            pass
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return cls(grads, buffers, [(m, m.training) for m in model.modules()], snapshot_checkpointing(model), rng)

    def restore(self) -> None:
        import torch

        for param, grad in self.grads:
            param.grad = grad
        with torch.no_grad():
            for module, refs, values in self.buffers:
                module._buffers.update(refs)  # buffers a first forward adds stay, like its hooks
                for name, value in values.items():
                    refs[name].copy_(value)
        for module, training in self.training:
            module.training = training
        restore_checkpointing(self.checkpointing)
        torch.set_rng_state(self.rng["torch"])
        random.setstate(self.rng["python"])
        if "numpy" in self.rng:
            import numpy

            numpy.random.set_state(self.rng["numpy"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state_all(self.rng["cuda"])


def autocast_for(device, mixed: Optional[str]):
    import torch

    if mixed is None:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def predicted_peak(model, spec: ProbeBatch, policy: str, kwargs: Optional[dict], mixed: Optional[str],
                   limit: Optional[int], loss_fn: Optional[Callable] = None, measure_fn: Optional[Callable] = None) -> int:
    """Peak bytes of a step on ``spec``'s batch, from two small probes: one and two copies of its longest sequence.

    A step's memory grows by the same amount with each further sequence of the same length (its
    activations, the attention's per-sequence work, the logits' rows), on top of what does not grow
    (weights, gradients): two small steps give both parts, so the full batch never has to be
    allocated to know whether it fits — the probe itself stays far below the memory it predicts, and
    costs a fraction of a full step. Batches of one or two sequences are measured as they are.
    ``limit`` bounds the small probes (a simulated out-of-memory error past it, on a CPU); whether the
    predicted peak fits is the caller's decision.
    """
    measure_fn = measure_fn or measure
    count = len(spec.lengths)
    if count <= 2:
        return measure_fn(model, spec, policy, kwargs, mixed, limit, loss_fn=loss_fn)
    longest = max(spec.lengths)
    one = measure_fn(model, ProbeBatch([longest], spec.flat), policy, kwargs, mixed, limit, loss_fn=loss_fn)
    two = measure_fn(model, ProbeBatch([longest] * 2, spec.flat), policy, kwargs, mixed, limit, loss_fn=loss_fn)
    return two + max(0, two - one) * (count - 2)


def model_loss(model, batch: dict):
    """The loss of a plain forward (when no trainer's own loss is given)."""
    outputs = model(**batch, use_cache=False)
    return outputs["loss"] if isinstance(outputs, dict) else outputs[0]


def run_probe(model, batch: dict, policy: str, kwargs: Optional[dict], mixed: Optional[str],
              loss_fn: Optional[Callable] = None) -> None:
    """One forward+backward of ``batch`` under ``policy`` (the model's checkpointing set for it).

    ``loss_fn(model, batch)`` is the trainer's own loss (TRL's fused LM head, say): the probe must
    allocate what a training step allocates, not what a plain forward with full logits would.
    """
    install(model, policy, kwargs)
    model.train()
    for param in model.parameters():
        param.grad = None
    with autocast_for(batch["input_ids"].device, mixed):
        loss = (loss_fn or model_loss)(model, batch)
    loss.backward()


def measure(model, spec: ProbeBatch, policy: str, kwargs: Optional[dict], mixed: Optional[str],
            limit: Optional[int], step: Optional[Callable] = None, loss_fn: Optional[Callable] = None) -> int:
    """Peak bytes of one step under ``policy``; the model, grads and RNG are restored afterwards.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the live
    tensor bytes counted by ``_LiveBytes`` (raising a simulated out-of-memory error past ``limit``).
    """
    import torch

    step = step or run_probe
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    vocab = model.get_input_embeddings().num_embeddings
    point = RestorePoint.take(model)
    try:
        batch = make_batch(spec, vocab, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(model, batch, policy, kwargs, mixed, loss_fn)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device))
        tracker = _LiveBytes(limit)
        for tensor in [*params, *model.buffers(), *(p.grad for p in params if p.grad is not None),
                       *(v for v in batch.values() if isinstance(v, torch.Tensor))]:
            tracker.track(tensor)
        tracker.check()
        with tracker.measuring():
            step(model, batch, policy, kwargs, mixed, loss_fn)
        tracker.check()
        return tracker.peak
    finally:
        batch = None
        point.restore()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
