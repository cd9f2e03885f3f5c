"""The plan's edits live while ``train()`` runs, and the training dataloader alone flattens.

``Trainer.train``: on entry the model is switched to the plan's attention, its recognised
layers get fused forwards and its cache is turned off; on return (or an exception) every edit
is rolled back, so ``generate()``, ``evaluate()`` and ``predict()`` after training see the model
exactly as the user gave it. Inside ``train()`` the attention takes only the calls it can
compute as the model would (see ``attention.dispatch``): evaluation batches, which keep TRL's
padded layout, run on the model's own attention.

``Trainer.get_train_dataloader``: the padding-free collator prepared at ``SFTTrainer.__init__``
serves the training dataloader; ``trainer.data_collator`` stays TRL's own, so the evaluation
and prediction dataloaders return stock-shaped batches (predictions ``[B, L, V]``, every label).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from .. import fallback, log, startup, warmup
from ..edits import Edits
from ..settings import current
from .trainer_facts import base_model

PLAN_ATTRIBUTE = "_unsloth_patch_plan"
COLLATOR_ATTRIBUTE = "_unsloth_patch_train_collator"
ACTIVE_ATTRIBUTE = "_unsloth_patch_edits_active"
COMPONENT = "training edits"


def _set(obj, name, value) -> None:
    object.__setattr__(obj, name, value)


def remember_plan(trainer, plan) -> None:
    _set(trainer, PLAN_ATTRIBUTE, plan)


def plan_of(trainer):
    return getattr(trainer, PLAN_ATTRIBUTE, None)


@dataclass(frozen=True)
class TrainingData:
    """What the training dataloader gets instead of the trainer's own collator (and dataset)."""

    wrapped: object  # the trainer's collator this was built from: if the user replaces it, ours steps aside
    collator: object  # the padding-free collator (behind a RowCollator when our packer runs)
    rows: object = None  # our packer's rows of the training examples
    examples: object = None  # the per-example dataset the rows index


def install_collator(trainer, wrapped, train_collator, rows=None) -> None:
    """Serve ``train_collator`` (and the packed ``rows``, if any) to the training dataloader while
    the trainer's collator is ``wrapped``."""
    _set(trainer, COLLATOR_ATTRIBUTE, TrainingData(wrapped, train_collator, rows, trainer.train_dataset))


def uninstall_collator(trainer) -> None:
    trainer.__dict__.pop(COLLATOR_ATTRIBUTE, None)


def _training_data(trainer):
    entry = getattr(trainer, COLLATOR_ATTRIBUTE, None)
    return entry if entry is not None and trainer.data_collator is entry.wrapped else None


def train_collator(trainer):
    """The collator the training dataloader uses (ours, or the trainer's own)."""
    entry = _training_data(trainer)
    return entry.collator if entry is not None else trainer.data_collator


def train_rows(trainer):
    """The packed training rows our packer made, while the trainer's dataset is still the one packed."""
    entry = _training_data(trainer)
    if entry is not None and entry.rows is not None and trainer.train_dataset is entry.examples:
        return entry.rows
    return None


def handle_get_train_dataloader(proceed, trainer, args, kwargs):
    collator = train_collator(trainer)
    if collator is trainer.data_collator:  # no plan, or the user replaced the collator since
        return proceed(*args, **kwargs)
    rows = train_rows(trainer)
    own, dataset = trainer.data_collator, trainer.train_dataset
    trainer.data_collator = collator
    if rows is not None:
        trainer.train_dataset = rows
    try:
        return proceed(*args, **kwargs)
    finally:
        trainer.data_collator, trainer.train_dataset = own, dataset


def handle_train(proceed, trainer, args, kwargs):
    called_at = time.perf_counter()
    # a warm-up done before train() (a LoRA model's set-up can outlast the compiles) costs no wait, and is reported
    waiting = startup.phase("waiting for kernel compilation") if warmup.pending() else contextlib.nullcontext()
    with waiting:
        outcome = warmup.wait()
    if outcome:
        startup.note("kernel warm-up", warmup.describe(outcome))
    callback = _startup_callback(called_at)
    trainer.add_callback(callback)
    try:
        with active(trainer):
            return proceed(*args, **kwargs)
    finally:
        trainer.remove_callback(callback)


def _startup_callback(called_at: float):
    """Logs the plugin's start-up at the first step of this train() (the callback lives as long as the call)."""
    from transformers import TrainerCallback

    class StartupLog(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            startup.train_started(called_at)

    return StartupLog()


@contextlib.contextmanager
def active(trainer):
    """The plan's model edits for the duration of the block (re-entrant; no plan: nothing)."""
    plan = plan_of(trainer)
    if plan is None or getattr(trainer, ACTIVE_ATTRIBUTE, False):
        yield
        return
    edits = Edits()
    try:
        apply_model_edits(trainer, plan, current(), edits)
    except Exception as exc:
        edits.rollback()
        if fallback.propagates(exc):
            raise
        fallback.failed(COMPONENT, exc, "the model as given and padded batches")  # the collator reads this
        yield
        return
    _set(trainer, ACTIVE_ATTRIBUTE, True)
    try:
        yield
    finally:
        _set(trainer, ACTIVE_ATTRIBUTE, False)
        edits.rollback()


def apply_model_edits(trainer, plan, settings, edits: Edits) -> None:
    """Make the model match the plan for training; every change goes through ``edits``."""
    from ..layers import fuse_model_layers

    model = base_model(trainer.model)
    replicated = replicated_reason(trainer)
    with startup.phase("fused layers"):
        fuse_model_layers(model, settings, edits, refused=replicated)
        _keep_lora_inputs(model, settings, edits)
        _fuse_lora(model, settings, edits, refused=replicated)
    if not (plan.padding_free or plan.boundaries_only or plan.packer):
        return
    if getattr(model.config, "use_cache", False):
        # A cache during the training forward turns off packed-sequence handling in transformers (its
        # packed-mask detection needs no cache); so also for TRL's packed rows left as they are: on
        # transformers 4.x the Trainer leaves config.use_cache on, and a training forward without
        # use_cache=False would let the rows' examples attend to each other.
        edits.setattr(model.config, "use_cache", False)
    if not (plan.padding_free or plan.boundaries_only):
        return
    if plan.attention:
        from .. import plan as planning
        from ..attention.dispatch import set_preference

        set_preference(settings.attention)
        if plan.attention == planning.LEGACY:
            from ..attention import legacy

            legacy.switch(model, edits)
        else:
            set_attention(model, plan.attention, edits)


def _lora_edit(settings, kernel: str, run, refused=None) -> dict:
    """``run()``'s outcome, or why it did not run: the caller's reason, ``KERNELS=off`` or ``KERNELS_OFF``."""
    if refused:
        return {"reason": refused}
    if settings.kernels == "off":
        return {"reason": "turned off by UNSLOTH_PATCH_KERNELS=off"}
    if kernel in settings.kernels_off:
        return {"reason": f"turned off by UNSLOTH_PATCH_KERNELS_OFF={kernel}"}
    return run()


def _keep_lora_inputs(model, settings, edits: Edits) -> None:
    """LoRA layers without PEFT's float32 copies of their input under autocast (``lora_inputs``)."""
    from .. import lora_inputs

    outcome = _lora_edit(settings, "lora_cast", lambda: lora_inputs.keep_input_dtype(model, edits))
    if outcome.get("edited"):
        log.logger.info("LoRA inputs: %d layers keep the compute dtype under autocast (%d keep PEFT's cast)",
                        outcome["edited"], len(outcome["kept"]))
    lora_inputs.remember(outcome)


def replicated_reason(trainer):
    """Why instance forwards must stay as they are: ``nn.DataParallel`` (the Trainer's choice when one process
    sees several GPUs) copies each module's ``__dict__`` into its replicas, so a forward bound to the original
    module would run the original's weights on every device. None when the model is not replicated."""
    gpus = getattr(trainer.args, "n_gpu", 1)
    if isinstance(gpus, int) and gpus > 1:
        return (f"the Trainer replicates the model over {gpus} GPUs with nn.DataParallel (one process, no "
                "torchrun/accelerate launch): fused forwards stay off; launch one process per GPU to use them")
    return None


def _fuse_lora(model, settings, edits: Edits, refused=None) -> None:
    """LoRA layers as one autograd node each, sibling projections of one input as one (``lora_fusion``)."""
    from .. import lora_fusion

    outcome = _lora_edit(settings, "lora", lambda: lora_fusion.fuse(model, edits), refused)
    if outcome.get("fused"):
        log.logger.info("LoRA layers: %d fused (%d in sibling groups sharing one input; %d left to PEFT)",
                        outcome["fused"], outcome["grouped"], len(outcome["kept"]))
        _fuse_4bit_matmuls(settings, edits)
    lora_fusion.remember(outcome)


def _fuse_4bit_matmuls(settings, edits: Edits) -> None:
    """With ``UNSLOTH_PATCH_MATMUL_4BIT=fused``, the fused LoRA layers' 4-bit weights that are not kept dense run our
    dequantise-in-the-matmul kernels for this ``train()`` (``matmul_4bit_plan`` decides per weight)."""
    from ..kernels import projection

    def stop() -> None:
        for how, count in projection.matmul_4bit_choices().items():
            log.logger.info("4-bit matmuls: %d weights %s", count, how)
        projection.fusing_4bit(False)

    if getattr(settings, "matmul_4bit", "bitsandbytes") == "fused":
        log.once(("matmul_4bit", "slow"), logging.WARNING,
                 "UNSLOTH_PATCH_MATMUL_4BIT=fused: 4-bit weights not kept dense are dequantised inside our matmul "
                 "kernels, measured 15-32x slower per projection than bitsandbytes + cuBLAS at training sizes "
                 "(docs/kernel-notes.md); unset it to train at full speed")
        edits.call(lambda: projection.fusing_4bit(True), stop)


def set_attention(model, name: str, edits: Edits) -> None:
    """Switch ``model`` to attention ``name``, remembering the implementation it falls back to."""
    from ..attention import dispatch

    previous = model.config._attn_implementation
    if previous == name:
        return
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        configs.append(text)
    for config in configs:
        edits.call(lambda c=config: dispatch.remember_original(c, previous),
                   lambda c=config: dispatch.forget_original(c))
    if hasattr(model, "set_attn_implementation"):
        edits.call(lambda: model.set_attn_implementation(name), lambda: model.set_attn_implementation(previous))
    else:
        edits.setattr(model.config, "_attn_implementation", name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"the model refused attention implementation {name!r}")
    log.logger.log(logging.DEBUG, "attention: %s -> %s for this train()", previous, name)
