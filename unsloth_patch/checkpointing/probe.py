"""The probe: small training steps of the largest batch's sequences, under each candidate policy.

Each step runs on a random-token batch laid out as the run lays out its batches, through the
trainer's own loss, and puts back everything it touched (``RestorePoint``); what it allocated is
freed when it returns (``release`` after a step that ran out of memory). It is measured phase by
phase (``meter``), cut at each layer's forward entry and exit, at the arrival of the gradient of
its output and at the start of the backward; ``predicted_peak`` extrapolates steps of two and four
sequences to the full batch (``estimate``). Which steps run, and in which order, is ``ladder``'s.
"""

from __future__ import annotations

import contextlib
import gc
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

from . import estimate
from .functions import install, restore_checkpointing, snapshot_checkpointing
from .meter import CudaBytes, LiveBytes, boundary


@dataclass
class ProbeBatch:
    lengths: list  # sequence lengths of the largest batch
    flat: bool  # padding-free: one row with position_ids restarting per sequence


def make_batch(spec: ProbeBatch, vocab_size: int, device, seed: int = 0) -> dict:
    """Random-token batch of ``spec``'s shape; its own generator leaves the global RNG untouched."""
    import torch

    from ..collate import boundaries_from_lengths

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


@contextlib.contextmanager
def forward_as_prepared(model, device, mixed: Optional[str]):
    """The model's forward as ``Accelerator.prepare`` sets it up under mixed precision: autocast around the
    forward only, and its fp16/bf16 outputs converted to fp32 (a full copy of the logits where the model
    returns them); the loss's metrics outside the forward run in the outputs' precision."""
    if mixed is None:
        yield
        return
    try:
        from accelerate.utils import convert_to_fp32
    except ImportError:  # pragma: no cover - transformers' Trainer needs accelerate
        def convert_to_fp32(outputs):
            return outputs
    missing = object()
    own = model.__dict__.get("forward", missing)
    inner = model.forward

    def forward(*args, **kwargs):
        with autocast_for(device, mixed):
            outputs = inner(*args, **kwargs)
        return convert_to_fp32(outputs)

    model.forward = forward
    try:
        yield
    finally:
        if own is missing:
            model.__dict__.pop("forward", None)
        else:
            model.forward = own


def predicted_peak(model, spec: ProbeBatch, policy: str, kwargs: Optional[dict], mixed: Optional[str],
                   limit: Optional[int], loss_fn: Optional[Callable] = None, measure_fn: Optional[Callable] = None) -> int:
    """Peak bytes of a step on ``spec``'s batch, from two smaller steps: two and four copies of its longest sequence.

    Past the first sequence or two, each phase of a step grows by the same amount with each further
    sequence of the same length (its activations, the attention's per-sequence work, its rows of
    logits) on top of what does not grow (weights, gradients): steps of 2 and 4 copies of the longest
    sequence give both parts, phase by phase, so the full batch never has to be allocated to know
    whether it fits (``estimate.extrapolate``). Batches of up to four sequences are measured as they
    are. ``limit`` bounds the steps (a simulated out-of-memory error past it, on a CPU); whether the
    predicted peak fits is the caller's decision. (The trainer's probe runs the same steps through
    ``ladder``, each predicted before it runs.)
    """
    measure_fn = measure_fn or measure
    count = len(spec.lengths)
    if count <= estimate.STEP_SIZES[-1]:
        return measure_fn(model, spec, policy, kwargs, mixed, limit, loss_fn=loss_fn)
    longest = max(spec.lengths)
    small, large = (measure_fn(model, ProbeBatch([longest] * n, spec.flat), policy, kwargs, mixed, limit,
                               loss_fn=loss_fn, phases=True) for n in estimate.STEP_SIZES[-2:])
    return estimate.extrapolate(small, large, count)


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
    _mark_recomputation(model)
    model.train()
    for param in model.parameters():
        param.grad = None
    with forward_as_prepared(model, batch["input_ids"].device, mixed):
        loss = (loss_fn or model_loss)(model, batch)
    boundary("backward")  # the forward (and the loss's metrics) ends here
    loss.backward()


def _mark_recomputation(model) -> None:
    """Each checkpointed function marks a phase boundary when it runs and when it returns, so that a layer's
    recomputation in the backward is a phase of its own, and the layer's backward the next one
    (``RestorePoint`` puts the checkpoint functions back)."""
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = _marked(func)


def _marked(checkpoint):
    def checkpointed(function, *args, **kwargs):
        def run(*inner, **named):
            boundary("recompute")
            try:
                return function(*inner, **named)
            finally:  # the layer's backward follows (also after PyTorch stops a recomputation early)
                boundary("recomputed")

        return checkpoint(run, *args, **kwargs)

    return checkpointed


def blocks(model) -> list:
    """The model's repeated layers: the children of its largest ``ModuleList`` (by parameter count)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        return []
    biggest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(biggest)


def _phase_hooks(model) -> list:
    """Phase boundaries at each layer's forward entry and exit and at the arrival of its output's gradient."""
    import torch

    def entered(module, args):
        boundary("layer")

    def left(module, args, output):
        boundary()
        first = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(first, torch.Tensor) and first.requires_grad:
            first.register_hook(lambda grad: boundary("backward"))

    handles = []
    for block in blocks(model):
        handles += [block.register_forward_pre_hook(entered), block.register_forward_hook(left)]
    return handles


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(model, spec: ProbeBatch, policy: str, kwargs: Optional[dict], mixed: Optional[str],
            limit: Optional[int], step: Optional[Callable] = None, loss_fn: Optional[Callable] = None,
            phases: bool = False):
    """Peak bytes of one step under ``policy`` (``phases``: its ``estimate.Step``); the model, grads and RNG
    are restored afterwards.

    CUDA: ``torch.cuda.max_memory_allocated`` per phase. CPU: the live tensor bytes counted by
    ``LiveBytes`` (raising a simulated out-of-memory error past ``limit``).
    """
    import torch

    step = step or run_probe
    began = time.perf_counter()
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    vocab = model.get_input_embeddings().num_embeddings
    point = RestorePoint.take(model)
    hooks = _phase_hooks(model) if phases else []
    batch = inputs = None
    completed = False
    try:
        batch = make_batch(spec, vocab, device)
        inputs = [v for v in batch.values() if isinstance(v, torch.Tensor)]
        if device.type == "cuda":
            meter = CudaBytes(device)
            baseline = torch.cuda.memory_allocated(device) - _nbytes(inputs)
            context = meter.measuring()
        else:
            meter = LiveBytes(limit)
            for tensor in [*params, *model.buffers(), *(p.grad for p in params if p.grad is not None), *inputs]:
                meter.track(tensor)
            meter.check()
            baseline = meter.current - _nbytes(inputs)
            context = meter.measuring(phases=True)
        meter.grads = lambda: _nbytes(p.grad for p in params if p.grad is not None)
        prepared = time.perf_counter()
        with context:
            step(model, batch, policy, kwargs, mixed, loss_fn)
        stepped = time.perf_counter()
        completed = True
    finally:
        for handle in hooks:
            handle.remove()
        batch = inputs = None
        point.restore()
        release(device, cache=not completed)
    parts = (prepared - began, stepped - prepared, time.perf_counter() - stepped)
    result = estimate.Step(len(spec.lengths), baseline, tuple(meter.phases), tuple(meter.starts),
                           tuple(meter.kinds), meter.end_grads, tuple(round(part, 4) for part in parts))
    return result if phases else result.peak


def release(device, cache: bool = True) -> None:
    """Free what a probe step left to the garbage collector and, with ``cache``, return the CUDA allocator's
    cached blocks to the driver. After a step that ran out of memory, call it again once the error is gone: its
    frames held the step's tensors.

    A step that completed keeps the cache (``cache=False``): the peaks are allocated bytes, which cached blocks do
    not count, and under ``meter.memory_cap`` the allocator itself returns cached blocks before it reports an
    out-of-memory error. An emptied cache makes the next step, or the run's first, allocate every block from the
    driver again (about 300 device allocations for a step of the 1.1B Llama).
    """
    import torch

    gc.collect()
    if cache and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def floor_bytes(model) -> int:
    """The least a training step of ``model`` holds: what is allocated now (on a CPU: its parameters and
    buffers) plus a gradient for each trainable parameter that has none yet."""
    import torch

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if device.type == "cuda":
        held = int(torch.cuda.memory_allocated(device))
    else:
        held = _nbytes([*params, *model.buffers()])
    return held + _nbytes(p for p in params if p.requires_grad and p.grad is None)
