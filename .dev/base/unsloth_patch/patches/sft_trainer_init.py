"""``SFTTrainer.__init__``: gather the facts, let TRL build the trainer, then apply the plan.

TRL builds the trainer exactly as it would without us (same dataset preparation, same
truncation, same collator); afterwards the plan is decided and prepared: a padding-free
collator for the training dataloader. Nothing of the model changes here: its edits (varlen
attention, fused layers) live only while ``train()`` runs (``training_edits``), so evaluation,
prediction and ``generate()`` outside training see the model as the user gave it.
"""

from __future__ import annotations

import copy
import inspect
import logging

from .. import log, packing, plan as planning, registry, startup, warmup
from ..attention.dispatch import COMPONENT as ATTENTION_COMPONENT
from ..collate import PaddingFreeCollator
from ..edits import Edits
from ..errors import UnslothPatchError
from ..settings import current
from . import training_edits
from .config_fields import carry_explicit, mark_explicit, was_explicit
from .trainer_facts import base_model as _base_model, boundary_packer, dataset_lengths, gather_facts, max_length_of


def handle_sft_trainer_init(proceed, instance, args, kwargs):
    settings = current()
    bound = _bind(instance, args, kwargs)
    if bound is None:  # arguments TRL itself will reject: let it
        return proceed(*args, **kwargs)
    config = bound.get("args")
    warmup.start(bound.get("model"), config, settings)  # compiles while TRL prepares the dataset
    explicit_padding_free = _explicit_padding_free(config)
    packer = _packer(config, settings)
    before = Edits()
    if explicit_padding_free and packer is None and hasattr(config, "padding_free") and settings.padding_free != "off":
        # TRL's own padding-free skips truncation (or refuses max_length); we flatten after TRL's
        # padded-path truncation instead, so every example is cut exactly as in the padded run.
        before.setattr(config, "padding_free", False)
    if packer == "trl" and not config.packing:  # UNSLOTH_PATCH_PACKING=on: as if packing=True was passed
        config.packing = True
        mark_explicit(config, {"packing"})
    if packer == "ours":
        # TRL prepares the examples one by one (tokenised, truncated, masked as for the padded run);
        # they are packed into rows afterwards, whole, each its own sequence.
        before.setattr(config, "packing", False)
    try:
        result = proceed(*args, **kwargs)
    finally:
        before.rollback()
    trainer = instance
    startup.begin()
    if packer == "ours" and not trainer.args.packing:
        trainer.args.packing = True  # UNSLOTH_PATCH_PACKING=on: the trainer trains on packed rows
    converted = getattr(trainer, "args", config)
    if config is not None and type(converted) is not type(config) and isinstance(converted, type(config)):
        carry_explicit(config, converted)  # TRL turned a TrainingArguments into its SFTConfig
    try:
        with startup.phase("plan"):
            facts = gather_facts(trainer, bound, explicit_padding_free, settings, packer)
            plan = planning.decide(settings, facts)
            prepare(trainer, plan, settings)
    except UnslothPatchError:
        raise
    except Exception as exc:
        training_edits.uninstall_collator(trainer)
        if settings.padding_free == "on":
            raise UnslothPatchError(f"UNSLOTH_PATCH_PADDING_FREE=on, but applying it failed: {exc}") from exc
        plan = planning.Plan(padding_free_reason=f"plan rolled back after an error: {exc}")
        log.once(("plan-error", type(exc).__name__), logging.WARNING,
                 "could not apply the padding-free plan (%s); this trainer runs unchanged", exc)
    training_edits.remember_plan(trainer, plan)
    planning.remember(plan)
    if packer is not None and plan.packer is None and "attend" in plan.padding_free_reason:
        log.once(("packing", plan.padding_free_reason), logging.WARNING, "packing: %s", plan.padding_free_reason)
    log.logger.info("padding-free: %s (%s)", "on" if plan.padding_free else "off", plan.padding_free_reason)
    if plan.attention or plan.attention_reason:
        log.logger.info("attention: %s", plan.attention_reason)
    return result


def _bind(instance, args, kwargs):
    from trl.trainer.sft_trainer import SFTTrainer

    original = inspect.unwrap(SFTTrainer.__init__)
    try:
        return inspect.signature(original).bind(instance, *args, **kwargs).arguments
    except TypeError:
        return None


def _packer(config, settings):
    """Who packs this trainer's rows ("trl", "ours") or None, decided before TRL's init."""
    if config is None or not hasattr(config, "packing"):
        return None
    from trl import SFTConfig

    wrapped = getattr(config, "packing_strategy", None) == "wrapped" and was_explicit(config, "packing_strategy") \
        is not False
    return planning.packing_mode(settings, bool(config.packing), boundary_packer(SFTConfig), wrapped)


def _explicit_padding_free(config):
    if config is None or not hasattr(config, "padding_free"):
        return None
    explicit = was_explicit(config, "padding_free")
    if explicit is None:  # config built before the plugin was active: only a True is surely deliberate
        return True if config.padding_free else None
    return bool(config.padding_free) if explicit else None


def prepare(trainer, plan: planning.Plan, settings) -> None:
    """Build what the plan needs for training; the trainer and the model stay as TRL made them.

    The padding-free collator serves the training dataloader only (evaluation and prediction keep
    TRL's batches, so predictions and metrics are shaped as stock); the model's edits (attention,
    fused layers) are applied for the duration of ``train()`` by ``training_edits``.
    """
    if plan.packer == "TRL":
        plan.packing_efficiency = _trl_packing_efficiency(trainer)
    if not (plan.padding_free or plan.boundaries_only):
        return
    collator = trainer.data_collator
    inner = collator
    if hasattr(collator, "return_position_ids") and not getattr(collator, "return_position_ids"):
        # TRL 0.19-0.23 drop position_ids unless FlashAttention is selected: boundaries would be lost.
        inner = copy.copy(collator)
        inner.return_position_ids = True
    model = _base_model(trainer.model)
    train_collator = PaddingFreeCollator(inner, _counts_first_labels(trainer), boundaries=_forward_takes_boundaries(model),
                                         needs=(training_edits.COMPONENT,) + ((ATTENTION_COMPONENT,) if plan.attention
                                                                              else ()))
    rows = None
    if plan.packer == planning.OUR_PACKER:
        rows, plan.packing_efficiency = _pack(trainer)
        train_collator = packing.RowCollator(train_collator)
    training_edits.install_collator(trainer, collator, train_collator, rows)
    if plan.padding_free and plan.padding_free_reason.startswith("padding_free=True") and \
            hasattr(trainer, "padding_free"):
        object.__setattr__(trainer, "padding_free", True)  # the trainer says what its batches are
    if plan.padding_free:
        _log_truncation(trainer)


def _pack(trainer):
    """The training examples in rows of at most ``max_length`` tokens (best-fit decreasing)."""
    examples = trainer.train_dataset
    lengths = dataset_lengths(examples)
    if lengths is None:
        raise ValueError(f"packing needs a tokenized training dataset, got {type(examples).__name__}")
    capacity = int(max_length_of(trainer.args) or max(lengths))
    rows = packing.best_fit_decreasing(lengths, capacity)
    if getattr(trainer.args, "remove_unused_columns", True):
        examples = trainer._remove_unused_columns(examples, description="training")
    packed = packing.PackedRows(examples, rows, capacity)
    efficiency = packed.efficiency(lengths)
    log.logger.info("packing: %d examples in %d rows of %d tokens (%.1f%% filled) by %s",
                    sum(len(r) for r in rows), len(rows), capacity, 100 * efficiency, planning.OUR_PACKER)
    return packed, efficiency


def _trl_packing_efficiency(trainer):
    lengths = dataset_lengths(trainer.train_dataset)
    if not lengths:
        return None
    capacity = int(max_length_of(trainer.args) or max(lengths))
    return sum(lengths) / (len(lengths) * capacity)


def _forward_takes_boundaries(model) -> bool:
    """Older model classes reject unknown keywords; they get positions only (boundaries derived once)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == "cu_seq_lens_q" for p in parameters)


def _counts_first_labels(trainer) -> bool:
    """Whether this transformers counts loss tokens over unshifted labels (position 0 included).

    Then the padded run counts each sequence's first label and the padding-free batch, which must
    ignore it, needs the difference carried to the count (patch ``label_count``).
    """
    if "label_count" not in registry.applied_names():
        return False
    if getattr(trainer, "_loss_shifts_labels", None) is not None:
        return not trainer._loss_shifts_labels
    counter = getattr(type(trainer), "_get_num_items_in_batch", None) or getattr(type(trainer), "get_batch_samples")
    try:
        source = inspect.getsource(inspect.unwrap(counter))
    except (OSError, TypeError):
        return True
    return "[..., 1:]" not in source


def _log_truncation(trainer) -> None:
    max_length = max_length_of(trainer.args)
    lengths = dataset_lengths(trainer.train_dataset) if max_length else None
    if not lengths:
        return
    at_limit = sum(n >= max_length for n in lengths)
    log.once(("truncated", id(trainer.train_dataset)), logging.INFO,
             "%d of %d training examples are at max_length=%d (truncated exactly as the padded run)",
             at_limit, len(lengths), max_length)
