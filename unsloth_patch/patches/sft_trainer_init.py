"""``SFTTrainer.__init__``: gather the facts, let TRL build the trainer, then apply the plan.

TRL builds the trainer exactly as it would without us (same dataset preparation, same
truncation, same collator); afterwards the plan wraps that collator so its padded batches
become padding-free, and switches the model to the varlen attention. The plan is applied as a
whole or rolled back, so a trainer is never half-patched.
"""

from __future__ import annotations

import inspect
import logging

from .. import log, plan as planning, registry
from ..collate import PaddingFreeCollator
from ..edits import Edits
from ..errors import UnslothPatchError
from ..settings import current
from .config_fields import was_explicit

VISION_COLUMNS = ("image", "images", "video", "videos", "pixel_values")
PACKING_PADDING_FREE = ("bfd", "bfd_split", "ffd")


def handle_sft_trainer_init(proceed, instance, args, kwargs):
    settings = current()
    bound = _bind(instance, args, kwargs)
    if bound is None:  # arguments TRL itself will reject: let it
        return proceed(*args, **kwargs)
    config = bound.get("args")
    explicit_padding_free = _explicit_padding_free(config)
    packing = bool(getattr(config, "packing", False))
    before = Edits()
    if explicit_padding_free and not packing and hasattr(config, "padding_free") and settings.padding_free != "off":
        # TRL's own padding-free skips truncation (or refuses max_length); we flatten after TRL's
        # padded-path truncation instead, so every example is cut exactly as in the padded run.
        before.setattr(config, "padding_free", False)
    try:
        result = proceed(*args, **kwargs)
    finally:
        before.rollback()
    trainer = instance
    facts = gather_facts(trainer, bound, explicit_padding_free)
    plan = planning.decide(settings, facts)
    with Edits() as edits:
        try:
            apply_plan(trainer, plan, settings, edits)
        except UnslothPatchError:
            raise
        except Exception as exc:
            edits.rollback()
            if settings.padding_free == "on":
                raise UnslothPatchError(f"UNSLOTH_PATCH_PADDING_FREE=on, but applying it failed: {exc}") from exc
            plan = planning.Plan(padding_free_reason=f"plan rolled back after an error: {exc}")
            log.once(("plan-error", type(exc).__name__), logging.WARNING,
                     "could not apply the padding-free plan (%s); this trainer runs unchanged", exc)
    planning.remember(plan)
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


def _explicit_padding_free(config):
    if config is None or not hasattr(config, "padding_free"):
        return None
    explicit = was_explicit(config, "padding_free")
    if explicit is None:  # config built before the plugin was active: only a True is surely deliberate
        return True if config.padding_free else None
    return bool(config.padding_free) if explicit else None


def gather_facts(trainer, bound, explicit_padding_free) -> planning.TrainerFacts:
    config = trainer.args
    model = _base_model(trainer.model)
    model_config = getattr(model, "config", None)
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    user_collator = bound.get("data_collator")
    packing = bool(getattr(config, "packing", False))
    strategy = getattr(config, "packing_strategy", None)
    return planning.TrainerFacts(
        user_collator=type(user_collator).__name__ if user_collator is not None else None,
        user_collator_flattenable=_flattenable(user_collator),
        vision=_vision(trainer, bound),
        encoder_decoder=bool(getattr(model_config, "is_encoder_decoder", False)),
        model_type=str(getattr(model_config, "model_type", "")),
        layer_types=tuple(getattr(text_config, "layer_types", None) or ()),
        packing=packing,
        packing_padding_free=packing and strategy in PACKING_PADDING_FREE,
        padding_free_explicit=explicit_padding_free,
        attn_implementation=getattr(model_config, "_attn_implementation", None),
        attention_interface="attention_interface" in registry.applied_names(),
        legacy_attention_blocker=_legacy_blocker(model),
        packed_mask_detection=_has_packed_mask_detection(),
    )


def _legacy_blocker(model):
    if "attention_interface" in registry.applied_names():
        return "not needed"
    from ..attention import legacy

    return legacy.blocker(model)


def _base_model(model):
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def _flattenable(collator) -> bool:
    """TRL's and transformers' causal-LM collators pad with an attention mask: safe to flatten."""
    if collator is None:
        return False
    kind = type(collator)
    if kind.__name__ in ("DataCollatorForCompletionOnlyLM", "DataCollatorWithFlattening"):
        return True
    if kind.__name__ == "DataCollatorForLanguageModeling":
        return not getattr(collator, "mlm", False)
    return False


def _vision(trainer, bound):
    processor = bound.get("processing_class") or bound.get("tokenizer")
    try:
        from transformers import ProcessorMixin

        if isinstance(processor, ProcessorMixin):
            return f"multimodal processing_class ({type(processor).__name__})"
    except ImportError:
        pass
    if getattr(trainer, "_is_vision_dataset", False):
        return "vision dataset"
    dataset = bound.get("train_dataset")
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, dict):  # DatasetDict
        columns = [c for cols in columns.values() for c in cols]
    found = [c for c in (columns or ()) if c in VISION_COLUMNS]
    if found:
        return f"image/video columns in the dataset ({', '.join(found)})"
    return None


def _has_packed_mask_detection() -> bool:
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def apply_plan(trainer, plan: planning.Plan, settings, edits: Edits) -> None:
    """Make the trainer match the plan; every change goes through ``edits``."""
    from ..layers import fuse_model_layers; fuse_model_layers(_base_model(trainer.model), settings, edits)
    if not (plan.padding_free or plan.boundaries_only):
        return
    collator = trainer.data_collator
    if hasattr(collator, "return_position_ids") and not getattr(collator, "return_position_ids"):
        # TRL 0.19-0.23 drop position_ids unless FlashAttention is selected: boundaries would be lost.
        edits.setattr(collator, "return_position_ids", True)
    model = _base_model(trainer.model)
    if not isinstance(collator, PaddingFreeCollator):
        edits.setattr(trainer, "data_collator", PaddingFreeCollator(
            collator, _counts_first_labels(trainer), boundaries=_forward_takes_boundaries(model)))
    if getattr(model.config, "use_cache", False):
        # a cache during the training forward turns off packed-sequence handling in transformers
        edits.setattr(model.config, "use_cache", False)
    if plan.attention:
        from ..attention.dispatch import set_preference

        if settings.attention in ("triton", "torch"):
            _check_forced_backend(model, settings.attention)
        set_preference(settings.attention)
        if plan.attention == planning.LEGACY:
            from ..attention import legacy

            legacy.switch(model, edits)
        else:
            _set_attention(model, plan.attention, edits)
    if plan.padding_free:
        _log_truncation(trainer)


def _forward_takes_boundaries(model) -> bool:
    """Older model classes reject unknown keywords; they get positions only (boundaries derived once)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == "cu_seq_lens_q" for p in parameters)


def _check_forced_backend(model, preference: str) -> None:
    """A forced backend that cannot run on this model fails now, not in the first forward."""
    from ..attention import backends

    parameter = next(model.parameters())
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    backends.choose(preference, parameter.device, parameter.dtype, int(head_dim))


def _set_attention(model, name: str, edits: Edits) -> None:
    previous = model.config._attn_implementation
    if previous == name:
        return
    if hasattr(model, "set_attn_implementation"):
        edits.call(lambda: model.set_attn_implementation(name), lambda: model.set_attn_implementation(previous))
    else:
        edits.setattr(model.config, "_attn_implementation", name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"the model refused attention implementation {name!r}")


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
    max_length = getattr(trainer.args, "max_length", None) or getattr(trainer.args, "max_seq_length", None)
    dataset = trainer.train_dataset
    if not max_length or dataset is None or not hasattr(dataset, "data"):
        return
    try:
        import pyarrow.compute as pc

        column = dataset.data.column("input_ids")
        at_limit = int(pc.sum(pc.greater_equal(pc.list_value_length(column), max_length)).as_py() or 0)
    except Exception:
        return
    log.once(("truncated", id(dataset)), logging.INFO,
             "%d of %d training examples are at max_length=%d (truncated exactly as the padded run)",
             at_limit, len(dataset), max_length)
