"""Every patch in one table, and the bookkeeping that applies and removes them (``patching.py`` does one target).

A patch names its targets (``module:Qualified.attribute``), the TRL/transformers versions it
supports, its toggle, and either a *handler* that wraps each target (wrapt) or an *install*
function for registrations. Applying is idempotent and all-or-nothing per patch; a target
that is missing or has changed shape makes the patch skip with one warning, leaving the
original behaviour. ``remove()`` puts every original object back (same identity).

The first patch listed for a target ends up outermost: patches are applied bottom-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from . import log, patching, versions
from .patching import contained  # noqa: F401  (part of this module's interface: tests and handlers use it)
from .settings import Settings, current

TRL_MODULE = "trl.trainer.sft_trainer"
TRAINER_MODULE = "transformers.trainer"


@dataclass(frozen=True)
class Patch:
    """One declarative patch record."""

    name: str
    summary: str
    targets: tuple[str, ...]
    requires: Mapping[str, str]
    toggle: str
    active: Callable[[Settings], bool]
    handler: str = ""  # "module:function", wrapt-style: handler(proceed, instance, args, kwargs)
    install: str = ""  # "module:function" returning an uninstall callable (registrations)
    parameters: tuple[str, ...] = ()  # parameters each wrapped target must accept (shape check)


def _on(setting: str) -> Callable[[Settings], bool]:
    return lambda s: getattr(s, setting) != "off"


# The table. Read it top to bottom: what is patched, where, for which versions, under which toggle.
PATCHES: tuple[Patch, ...] = (
    Patch(
        name="compat_args",
        summary="Translate SFTTrainer arguments written for other TRL versions.",
        targets=(f"{TRL_MODULE}:SFTTrainer.__init__",),
        requires={"trl": ">=0.11"},
        toggle="COMPAT",
        active=_on("compat"),
        handler="unsloth_patch.patches.compat_args:handle_sft_trainer_init",
        parameters=("model", "args", "train_dataset"),
    ),
    Patch(
        name="compat_config",
        summary="Translate SFTConfig field names written for other TRL versions.",
        targets=("trl.trainer.sft_config:SFTConfig.__init__",),
        requires={"trl": ">=0.11"},
        toggle="COMPAT",
        active=_on("compat"),
        handler="unsloth_patch.patches.compat_args:handle_sft_config_init",
    ),
    Patch(
        name="config_fields",
        summary="Record which SFTConfig/TrainingArguments fields the user passed explicitly.",
        targets=("trl.trainer.sft_config:SFTConfig.__init__", "transformers.training_args:TrainingArguments.__init__"),
        requires={"trl": ">=0.11", "transformers": ">=4.46"},
        toggle="DISABLE",
        active=lambda s: True,
        handler="unsloth_patch.patches.config_fields:handle_config_init",
    ),
    Patch(
        name="trainer_plan",
        summary="Decide padding-free batching, the attention path and fused layers per trainer.",
        targets=(f"{TRL_MODULE}:SFTTrainer.__init__",),
        requires={"trl": ">=0.11", "transformers": ">=4.46"},
        toggle="PADDING_FREE",
        active=lambda s: any(v != "off" for v in (s.padding_free, s.attention, s.kernels)),
        handler="unsloth_patch.patches.sft_trainer_init:handle_sft_trainer_init",
        parameters=("model", "args", "train_dataset", "data_collator"),
    ),
    Patch(
        name="training_edits",
        summary="Apply the plan's model edits (attention, fused layers) for the duration of train() only.",
        targets=(f"{TRAINER_MODULE}:Trainer.train",),
        requires={"transformers": ">=4.46"},
        toggle="PADDING_FREE",
        active=lambda s: any(v != "off" for v in (s.padding_free, s.attention, s.kernels)),
        handler="unsloth_patch.patches.training_edits:handle_train",
        parameters=("resume_from_checkpoint", "trial"),
    ),
    Patch(
        name="model_warmup",
        summary="Begin compiling our kernels on threads when a bf16/fp16 model is built in a TRL script.",
        targets=("transformers.modeling_utils:PreTrainedModel.post_init",),
        requires={"transformers": ">=4.46"},
        toggle="KERNELS",
        active=lambda s: s.kernels != "off" or s.attention != "off",
        handler="unsloth_patch.patches.model_warmup:handle_post_init",
    ),
    Patch(
        name="fused_head_warmup",
        summary="Compile TRL's fused LM head kernels beside ours before the first step (TRL's head unchanged).",
        targets=(f"{TRL_MODULE}:add_fused_lm_head",),
        requires={"trl": ">=1.15"},
        toggle="KERNELS",
        active=_on("kernels"),
        handler="unsloth_patch.patches.fused_head_warmup:handle_add_fused_lm_head",
        parameters=("model", "outputs"),
    ),
    Patch(
        name="train_collator",
        summary="Serve the padding-free collator to the training dataloader (evaluation keeps TRL's).",
        targets=(f"{TRAINER_MODULE}:Trainer.get_train_dataloader",),
        requires={"transformers": ">=4.46"},
        toggle="PADDING_FREE",
        active=_on("padding_free"),
        handler="unsloth_patch.patches.training_edits:handle_get_train_dataloader",
    ),
    Patch(
        name="packed_eval_collator",
        summary="Give TRL's packed evaluation rows the training rows' boundaries (no example attends to another).",
        targets=(f"{TRAINER_MODULE}:Trainer.get_eval_dataloader", f"{TRAINER_MODULE}:Trainer.get_test_dataloader"),
        requires={"transformers": ">=4.46"},
        toggle="PADDING_FREE",
        active=_on("padding_free"),
        handler="unsloth_patch.patches.packed_eval:handle_dataloader",
    ),
    Patch(
        name="packed_eval_edits",
        summary="The plan's attention while an evaluation loop runs on TRL's packed rows (rolled back after).",
        targets=(f"{TRAINER_MODULE}:Trainer.evaluation_loop",),
        requires={"transformers": ">=4.46"},
        toggle="PADDING_FREE",
        active=_on("padding_free"),
        handler="unsloth_patch.patches.packed_eval:handle_evaluation_loop",
        parameters=("dataloader", "description"),
    ),
    Patch(
        name="label_count",
        summary="Count loss tokens of padding-free batches exactly as for the padded batch.",
        targets=(f"{TRAINER_MODULE}:Trainer.get_batch_samples",),
        requires={"transformers": ">=4.46"},
        toggle="PADDING_FREE",
        active=_on("padding_free"),
        handler="unsloth_patch.patches.label_count:handle_get_batch_samples",
        parameters=("epoch_iterator", "num_batches"),
    ),
    Patch(
        name="label_key_strip",
        summary="Keep the padding-free label count out of evaluation batches.",
        targets=(f"{TRAINER_MODULE}:Trainer._prepare_inputs",),
        requires={"transformers": ">=4.46"},
        toggle="PADDING_FREE",
        active=_on("padding_free"),
        handler="unsloth_patch.patches.label_count:handle_prepare_inputs",
    ),
    Patch(
        name="attention_interface",
        summary="Register the varlen attention under transformers' AttentionInterface.",
        targets=("transformers.modeling_utils:AttentionInterface",),
        requires={"transformers": ">=4.51"},
        toggle="ATTENTION",
        active=_on("attention"),
        install="unsloth_patch.attention.registration:install",
    ),
    Patch(
        name="embedding_lr",
        summary="Separate optimizer groups (and learning rate) for the input/output embeddings.",
        targets=(f"{TRAINER_MODULE}:Trainer.create_optimizer",),
        requires={"transformers": ">=4.46"},
        toggle="EMBEDDING_LR",
        active=lambda s: True,  # inert unless an embedding learning rate is set (config field or env)
        handler="unsloth_patch.patches.embedding_lr:handle_create_optimizer",
    ),
    Patch(
        name="embedding_lr_config",
        summary="Accept embedding_learning_rate= in TRL's SFTConfig.",
        targets=("trl.trainer.sft_config:SFTConfig",),
        requires={"trl": ">=0.11"},
        toggle="EMBEDDING_LR",
        active=lambda s: True,
        install="unsloth_patch.patches.embedding_lr:install_config_field",
    ),
    Patch(
        name="checkpointing",
        summary="Replace TRL's default gradient checkpointing by the cheapest policy that fits, probed at train start.",
        targets=(f"{TRAINER_MODULE}:Trainer.train",),
        requires={"transformers": ">=4.46"},
        toggle="CHECKPOINTING",
        active=_on("checkpointing"),
        handler="unsloth_patch.patches.checkpointing:handle_train",
        parameters=("resume_from_checkpoint", "trial"),
    ),
)


@dataclass
class PatchRecord:
    """What happened to one patch: applied, or skipped and why."""

    name: str
    targets: tuple[str, ...]
    toggle: str
    requires: dict
    applied: bool = False
    reason: str = "waiting for its target module to be imported"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "targets": list(self.targets),
            "toggle": self.toggle,
            "requires": dict(self.requires),
            "applied": self.applied,
            "reason": self.reason,
        }


@dataclass
class _Applied:
    patch: Patch
    restore: list = field(default_factory=list)  # callables, run in reverse


_records: dict[str, PatchRecord] = {}
_applied: dict[str, _Applied] = {}
_order: list[str] = []  # application order; removal runs it backwards
_automatic = True  # import hooks apply patches; remove() turns this off until apply()


def _record(patch: Patch) -> PatchRecord:
    rec = _records.get(patch.name)
    if rec is None:
        rec = _records[patch.name] = PatchRecord(patch.name, patch.targets, patch.toggle, dict(patch.requires))
    return rec


def _apply_one(patch: Patch, settings: Settings) -> None:
    rec = _record(patch)
    if patch.name in _applied:
        return
    if not patch.active(settings):
        rec.applied, rec.reason = False, f"turned off by UNSLOTH_PATCH_{patch.toggle}"
        return
    why = versions.unmet(patch.requires)
    if why is not None:
        rec.applied, rec.reason = False, f"not supported here: {why}"
        return
    if not patching.modules_ready(patch.targets):
        rec.applied, rec.reason = False, "waiting for its target module to be imported"
        return
    try:
        resolved = [patching.resolve(t) for t in patch.targets]
        for target, (_, _, value) in zip(patch.targets, resolved):
            patching.check_parameters(target, patching.unwrapped(value), patch.parameters)
        applied = _Applied(patch)
        try:
            if patch.install:
                applied.restore.append(patching.load(patch.install)(resolved))
            else:
                handler = patching.load(patch.handler)
                for owner, attribute, _ in resolved:
                    applied.restore.append(patching.wrap(patch.name, owner, attribute, handler))
        except BaseException:
            for undo in reversed(applied.restore):
                undo()
            raise
    except LookupError as exc:
        if patching.still_importing(patch.targets):
            rec.applied, rec.reason = False, "waiting for its target module to finish importing"
            return
        rec.applied, rec.reason = False, f"skipped: {exc}"
        log.once(("skip", patch.name), logging.WARNING,
                 "patch %r skipped, original behaviour kept: %s", patch.name, exc)
        return
    except Exception as exc:  # never break the user's import
        rec.applied, rec.reason = False, f"skipped: error while applying ({type(exc).__name__}: {exc})"
        log.once(("skip", patch.name), logging.WARNING,
                 "patch %r skipped after an error, original behaviour kept: %s", patch.name, exc, exc_info=True)
        return
    _applied[patch.name] = applied
    _order.append(patch.name)
    rec.applied, rec.reason = True, "applied"


def apply(names: Optional[list[str]] = None, settings: Optional[Settings] = None) -> list[PatchRecord]:
    """Apply every patch whose target is imported and whose versions and toggle allow it."""
    global _automatic
    settings = settings or current()
    if settings.disable:
        return report()
    _automatic = True
    wanted = [p for p in PATCHES if names is None or p.name in names]
    for patch in reversed(wanted):  # first listed ends outermost
        _apply_one(patch, settings)
    return report()


def remove(names: Optional[list[str]] = None) -> None:
    """Undo patches (all by default), restoring the original objects exactly."""
    global _automatic
    if names is None:
        _automatic = False
    targets = set(_order) if names is None else set(names) & set(_order)
    reapply = []
    while targets:
        name = _order.pop()
        for undo in reversed(_applied.pop(name).restore):
            undo()
        _record(_patch(name)).applied = False
        _record(_patch(name)).reason = "removed"
        if name in targets:
            targets.discard(name)
        else:
            reapply.append(name)
    settings = current()
    for name in reversed(reapply):
        _apply_one(_patch(name), settings)


def _patch(name: str) -> Patch:
    return next(p for p in PATCHES if p.name == name)


def on_import(module) -> None:
    """Post-import hook: apply what became possible. Never raises into the importer."""
    try:
        if _automatic:
            apply()
    except Exception as exc:  # pragma: no cover - defensive
        log.once(("hook", getattr(module, "__name__", module)), logging.WARNING,
                 "unsloth_patch could not apply its patches after importing %s: %s",
                 getattr(module, "__name__", module), exc)


def target_modules() -> list[str]:
    return sorted({patching.split(t)[0] for p in PATCHES for t in p.targets})


def report() -> list[PatchRecord]:
    """Structured records of every patch in the table."""
    return [_record(p) for p in PATCHES]


def applied_names() -> list[str]:
    return list(_order)
