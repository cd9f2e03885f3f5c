"""``Trainer.train``: choose the activation checkpointing policy once, before training starts.

transformers turns checkpointing on inside ``train`` (5.x) or ``_inner_training_loop`` (4.x),
so wrapping ``train`` decides before either. When the policy is not TRL's ``full``, the
trainer's ``gradient_checkpointing`` / ``activation_checkpointing`` argument is set to False for
the duration of the call (transformers then leaves the model alone) and the chosen checkpoint
function is installed on the model's layers directly. The arguments are restored when
``train`` returns; the decision is kept on the trainer and reused by a later ``train``.
"""

from __future__ import annotations

import logging

from .. import checkpointing as policy
from ..checkpointing import dense_4bit, mlp_chunk, per_batch
from .. import log, mlp_recompute, startup
from ..collate import PaddingFreeCollator
from ..edits import Edits
from ..settings import current
from . import per_batch as batch_choices
from . import seen_batches
from .config_fields import was_explicit
from .probe_loss import trainer_loss
from .step_shape import activation_bytes, step_shape
from .trainer_facts import base_model, dataset_lengths, max_length_of
from .training_edits import train_collator

_ATTRIBUTE = "_unsloth_patch_checkpointing"
FLAG_FIELDS = ("gradient_checkpointing", "activation_checkpointing")
KWARGS_FIELDS = ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")


def handle_train(proceed, trainer, args, kwargs):
    decision = getattr(trainer, _ATTRIBUTE, None)
    if decision is None:
        with startup.phase("checkpointing probe"):
            decision = decide(trainer, current())
        try:
            object.__setattr__(trainer, _ATTRIBUTE, decision)
        except Exception:
            pass
        policy.remember(decision)
        log.logger.info("%s", decision.summary())
    edits = Edits()
    tally = None
    try:
        if decision.changes_training:
            apply(trainer, decision.policy, edits)
            if decision.mlp_chunk is not None and decision.mlp_chunk.changed:
                mlp_recompute.set_chunk(_model(trainer), decision.mlp_chunk.tokens, edits)
            if decision.dense_4bit is not None and decision.dense_4bit.keep:
                _keep_dense_4bit(edits)
            tally = batch_choices.start(trainer, decision, kwargs_of(trainer.args), edits)
        elif decision.probed:
            _input_grads_for_reentrant(trainer)
        watch = seen_batches.watch(trainer, decision, edits)
    except Exception:
        edits.rollback()
        raise
    try:
        return proceed(*args, **kwargs)
    finally:
        edits.rollback()
        seen_batches.settle(decision, watch)
        batch_choices.settle(decision, tally)


# --------------------------------------------------------------------------- deciding


def checkpointing_on(args) -> bool:
    value = getattr(args, "activation_checkpointing", None)
    if value is None:
        value = getattr(args, "gradient_checkpointing", False)
    return bool(value)


def explicit_reason(args):
    """Why the user's checkpointing setting must be left alone, or None when it is TRL's default."""
    names = [n for n in FLAG_FIELDS + KWARGS_FIELDS if hasattr(args, n)]
    known = [was_explicit(args, n) for n in names]
    if any(k is None for k in known):
        return ("cannot tell whether gradient_checkpointing was passed (the config was created before "
                "unsloth_patch was imported); treated as explicit")
    passed = [n for n, k in zip(names, known) if k]
    if passed:
        return f"{', '.join(passed)} passed explicitly"
    return None


def _model(trainer):
    return trainer.model


def blocker(trainer, settings):
    """Config-level reasons (the same on every rank) to keep TRL's checkpointing without a probe."""
    args = trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(args, "deepspeed", None):
        return "DeepSpeed partitions the model after train() starts; the probe cannot measure it"
    if getattr(trainer, "model_init", None) is not None:
        return "model_init builds the model inside train()"
    if getattr(args, "auto_find_batch_size", False):
        return "auto_find_batch_size changes the batch size during train()"
    if getattr(base_model(_model(trainer)), "supports_gradient_checkpointing", True) is False:
        return "the model does not support gradient checkpointing"
    if _distributed_parameters(_model(trainer)):
        return ("the model's parameters are already distributed (DTensor: FSDP2 or tensor parallel), so a probe step "
                "would run collectives that a rank running out of memory would never reach")
    return None


def _distributed_parameters(model) -> bool:
    """Parameters that are DTensors (sharded or replicated over a device mesh): a forward runs collectives."""
    import sys

    tensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists
    dtensor = getattr(tensor, "DTensor", None)
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def kwargs_of(args) -> dict:
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        value = getattr(args, name, None)
        if value:
            return dict(value)
    return {}


def probe_spec(trainer):
    """The largest batch this run can produce: lengths of its sequences, flat or padded."""
    args = trainer.args
    batch_size = int(getattr(trainer, "_train_batch_size", None) or args.per_device_train_batch_size)
    max_length = max_length_of(args)
    packing = bool(getattr(args, "packing", False))
    flat = isinstance(train_collator(trainer), PaddingFreeCollator) or bool(getattr(args, "padding_free", False)) \
        or packing
    lengths = None if packing else dataset_lengths(trainer.train_dataset)
    if lengths:
        if max_length:
            lengths = [min(n, int(max_length)) for n in lengths]
        lengths = sorted(lengths, reverse=True)[:batch_size]
    elif max_length:
        lengths = [int(max_length)] * batch_size
    else:
        return None
    if not flat:
        lengths = [max(lengths)] * len(lengths)
    return policy.ProbeBatch(lengths=lengths, flat=flat)


def _mixed(args):
    if getattr(args, "bf16", False):
        return "bf16"
    if getattr(args, "fp16", False):
        return "fp16"
    return None


def mixed_precision(trainer):
    """The autocast a training step runs under: the accelerator's mixed precision, which is what
    ``train()`` uses, else the arguments'. (transformers 4.x ``TrainingArguments`` export
    ``ACCELERATE_MIXED_PRECISION`` to the process, so after a bf16 config, a later trainer's accelerator
    trains in bf16 whatever its own ``bf16`` says.)"""
    value = str(getattr(getattr(trainer, "accelerator", None), "mixed_precision", "") or "").lower()
    if value in ("bf16", "fp16"):
        return value
    return None if value == "no" else _mixed(trainer.args)


def memory_of(device, settings):
    """(card bytes, budget bytes) for ``device``; the budget is None when there is nothing to measure."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        available = free + torch.cuda.memory_reserved(device)
        return total, policy.budget_for(total, settings.memory_budget_gb, available)
    if settings.memory_budget_gb is None:
        return None, None
    budget = policy.budget_for(None, settings.memory_budget_gb)
    return budget, budget


def extra_bytes(trainer) -> int:
    """What a training step holds that the probe's step does not: the optimizer state (and DDP's buckets)."""
    model = _model(trainer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    nbytes = sum(p.numel() * p.element_size() for p in trainable)
    extra = policy.optimizer_state_bytes([(tuple(p.shape), p.element_size()) for p in trainable],
                                         getattr(trainer.args, "optim", "adamw_torch"), _optimizer_kwargs(trainer))
    world = int(getattr(trainer.args, "world_size", 1) or 1)
    if world > 1 and not getattr(trainer, "is_fsdp_enabled", False):
        extra += nbytes  # DDP's gradient buckets
    return extra


def _optimizer_kwargs(trainer) -> dict:
    """What transformers will construct the optimizer with (momentum, betas, ...), or {} when unknown."""
    getter = getattr(type(trainer), "get_optimizer_cls_and_kwargs", None)
    if getter is None:
        return {}
    for call in (lambda: getter(trainer.args, _model(trainer)), lambda: getter(trainer.args)):
        try:
            return dict(call()[1])
        except TypeError:
            continue
        except Exception:
            return {}
    return {}


def decide(trainer, settings) -> policy.Decision:
    args = trainer.args
    on = checkpointing_on(args)
    if settings.checkpointing == "off":
        return policy.Decision("full" if on else "none", "UNSLOTH_PATCH_CHECKPOINTING=off; left as configured")
    explicit = explicit_reason(args)
    if explicit is not None:
        return policy.Decision("full" if on else "none", f"{explicit}; left as configured")
    if not on:
        return policy.Decision("none", "gradient checkpointing is off")
    why = blocker(trainer, settings)
    if why is not None:
        return policy.Decision("full", f"TRL's default kept: {why}")
    try:
        decision = _decide_locally(trainer, settings)
    except Exception as exc:  # every rank must still reach the agreement below
        log.once(("checkpointing-probe", type(exc).__name__), logging.WARNING,
                 "checkpointing probe failed (%s: %s); keeping TRL's default", type(exc).__name__, exc)
        decision = policy.Decision("full", f"TRL's default kept: the probe failed ({type(exc).__name__}: {exc})")
    decision.local_policy = decision.policy
    agreed = policy.POLICIES[policy.agree_across_ranks(policy.POLICIES.index(decision.policy))]
    if agreed != decision.policy:
        decision.reason += f"; ranks agreed on the more conservative {agreed}"
        decision.policy = agreed
        decision.chosen_steps = []  # measured for this rank's own choice, not the agreed one
        decision.mlp_chunk = None  # sized for this rank's own choice: the agreed one runs the probed chunks
        decision.dense_4bit = dense_4bit.overruled(decision.dense_4bit, f"the ranks agreed on {agreed}, not none")
        decision.per_batch = None  # its faster candidates were measured against this rank's own choice
        decision.per_batch_reason = f"the ranks agreed on {agreed}, not this rank's {decision.local_policy}"
    if decision.policy != "full":
        decision.probed = True
    return decision


def _decide_locally(trainer, settings) -> policy.Decision:
    import torch

    model = _model(trainer)
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    expected = getattr(trainer.args, "device", device)
    if torch.device(expected).type != device.type:
        return policy.Decision("full", f"TRL's default kept: the model is on {device.type}, not yet on "
                                       f"the training device {expected}", device=str(device))
    card, budget = memory_of(device, settings)
    if budget is None:
        return policy.Decision("full", "TRL's default kept: no GPU and no UNSLOTH_PATCH_MEMORY_BUDGET_GB to "
                                       "measure against", device=str(device))
    spec = probe_spec(trainer)
    if spec is None:
        return policy.Decision("full", "TRL's default kept: no max_length and no tokenized dataset to size "
                                       "the probe batch", device=str(device), card_bytes=card, budget_bytes=budget)
    kwargs = kwargs_of(trainer.args)
    offered = {"none", "offload", "full"}
    if policy.selective_available() and not kwargs.get("use_reentrant"):
        offered.add("selective")
    rejected: dict = {}
    if not settings.kernel_on("mlp_recompute"):
        rejected["mlp_recompute"] = "turned off by UNSLOTH_PATCH_KERNELS_OFF=mlp_recompute"
    else:
        chunked, why = mlp_recompute.available(model)
        if chunked:
            offered.add("mlp_recompute")
        else:
            rejected["mlp_recompute"] = f"not available: {why}"
    candidates = [name for name in policy.PREFERENCE if name in offered]
    extra = extra_bytes(trainer)
    # a candidate fits when its step plus the optimizer state stays under the budget; on a CPU the budget
    # is simulated (an out-of-memory error past it), on a GPU the allocator is capped at the budget
    limit = max(0, budget - extra) if device.type != "cuda" else None
    mixed = mixed_precision(trainer)
    bound, note, copies = bound_of(trainer, spec, mixed, device)
    off = dense_off_reason(settings)
    if bound is not None and bound + extra <= budget:
        return policy.Decision("none", "an upper bound of the step without checkpointing, plus the optimizer state, "
                                       "fits the budget; no probe needed", extra_bytes=extra, budget_bytes=budget,
                               card_bytes=card, device=str(device), tokens=sum(spec.lengths), bound_bytes=bound,
                               dense_4bit=dense_4bit.choose(copies, bound, extra, budget, off))
    if bound is not None:
        note = "the upper bound without checkpointing does not fit the budget; probed"

    loss = trainer_loss(trainer)

    def run(name, batch):  # one probe step, looked up at call time (tests and benchmarks wrap it)
        return policy.measure(model, batch, name, kwargs, mixed, limit, loss_fn=loss, phases=True)

    ladder = policy.Ladder(spec, run, budget, extra, floor=policy.floor_bytes(model),
                           release=lambda: policy.release(device))
    with policy.memory_cap(device, budget), policy.quick_collections():
        chosen, peaks = policy.choose(candidates, ladder.peak, budget, extra, rejected=rejected)
    held = [r["peak"] for r in ladder.records if r["peak"] is not None]
    decision = policy.Decision("full", "", peaks=peaks, rejected=rejected, extra_bytes=extra, budget_bytes=budget,
                               card_bytes=card, device=str(device), tokens=sum(spec.lengths),
                               probe_peak_bytes=max(held) if held else None, probe_steps=ladder.records,
                               longest=max(spec.lengths))
    if chosen is None:
        decision.reason = "no candidate fits the budget; TRL's full checkpointing kept"
    else:
        decision.policy = chosen
        decision.chosen_steps = list(ladder.steps.get(chosen, ()))
        decision.reason = ("fastest candidate whose probed peak plus optimizer state fits the budget"
                           if chosen != "full" else "only full checkpointing fits the budget")
        decision.mlp_chunk = _chunk(model, spec, chosen, peaks.get(chosen), budget, extra, mixed, settings)
        uniform = None if settings.checkpointing == "auto" else \
            "UNSLOTH_PATCH_CHECKPOINTING=uniform: every batch runs the chosen policy as the worst batch would"
        if uniform is None and int(getattr(trainer.args, "world_size", 1) or 1) > 1:
            uniform = "several ranks: every batch runs the policy the ranks agree on (not yet chosen per batch)"
        decision.per_batch, decision.per_batch_reason = per_batch.facts(
            chosen, ladder.steps, max(spec.lengths), budget, extra, decision.mlp_chunk, uniform)
    decision.probed = True
    decision.bound_bytes, decision.bound_note = bound, note
    decision.dense_4bit = dense_4bit.choose(copies, None, extra, budget, off)
    return decision


def _chunk(model, spec, chosen, peak, budget, extra, mixed, settings):
    """The chunked MLPs' chunk for the chosen policy (``checkpointing/mlp_chunk.py``)."""
    probed = mlp_recompute.default_chunk()
    if not settings.kernel_on("mlp_chunk"):
        return mlp_chunk.as_probed(chosen, probed, "turned off by UNSLOTH_PATCH_KERNELS_OFF=mlp_chunk")
    itemsize = activation_bytes(model.parameters(), mixed)
    tokens = sum(spec.lengths) if spec.flat else len(spec.lengths) * max(spec.lengths)
    return mlp_chunk.choose(chosen, budget, peak, extra, mlp_recompute.bytes_per_token(model, itemsize), tokens,
                            probed)


def bound_of(trainer, spec, mixed, device):
    """(upper bound of the no-checkpointing step or None, why none is used, bytes of the 4-bit weights made
    dense) — on a CUDA device only: a CPU's budget is simulated by the probe's own accounting, which the
    bound does not replace (and a CPU run keeps no dense copies)."""
    if device.type != "cuda":
        return None, "the bound is used on CUDA devices only", 0
    shape = step_shape(trainer, spec, mixed)
    if shape is None:
        return None, "the model's config does not give the sizes the bound needs", 0
    why = policy.why_not_bounded(shape)
    return (None if why else policy.upper_bound(shape)), why or "", shape.dense_4bit_bytes


def dense_off_reason(settings):
    """Why 4-bit weights are dequantised on every call whatever the room (None: the room decides)."""
    if settings.dense_4bit != "auto":
        return "turned off (UNSLOTH_PATCH_DENSE_4BIT=off: every call dequantises)"
    if not settings.kernel_on("lora"):
        return "the fused LoRA layers, which read the kept copies, are off (UNSLOTH_PATCH_KERNELS, KERNELS_OFF=lora)"
    return None


def _keep_dense_4bit(edits: Edits) -> None:
    """4-bit weights dequantised once and kept for this ``train()``; the copies go when it returns."""
    from ..kernels import projection

    edits.call(lambda: projection.keeping_dense(True), lambda: projection.keeping_dense(False))


# --------------------------------------------------------------------------- applying


def apply(trainer, name: str, edits: Edits) -> None:
    """Make ``train`` run under policy ``name`` (not ``full``); argument changes go through ``edits``."""
    args = trainer.args
    kwargs = kwargs_of(args)
    for field in FLAG_FIELDS:
        if hasattr(args, field) and getattr(args, field):
            edits.setattr(args, field, False)
    policy.install(_model(trainer), name, kwargs)


def _input_grads_for_reentrant(trainer) -> None:
    """Reentrant checkpoints of a PEFT model need inputs that require grad (TRL < 0.24 does not do it)."""
    args = trainer.args
    model = _model(trainer)
    kwargs = kwargs_of(args)
    reentrant = kwargs.get("use_reentrant", True) if not kwargs or "use_reentrant" in kwargs else True
    if not (checkpointing_on(args) and reentrant and hasattr(model, "peft_config")):
        return
    base = base_model(model)
    if getattr(base, "_require_grads_hook", None) is None and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
