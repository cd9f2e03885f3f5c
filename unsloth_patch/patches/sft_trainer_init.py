"""``SFTTrainer.__init__``: gather the facts, let TRL build the trainer, then apply the plan.

TRL builds the trainer exactly as it would without us (same dataset preparation, same
truncation, same collator); afterwards the plan is decided and prepared: a padding-free
collator for the training dataloader. Nothing of the model changes here: its edits (varlen
attention, fused layers) live only while ``train()`` runs (``training_edits``), so evaluation,
prediction and ``generate()`` outside training see the model as the user gave it.
"""

from __future__ import annotations

import inspect
import logging

import copy

from .. import log, plan as planning, registry
from ..attention.dispatch import COMPONENT as ATTENTION_COMPONENT
from ..collate import PaddingFreeCollator
from ..edits import Edits
from ..errors import UnslothPatchError
from ..settings import current
from . import training_edits
from .config_fields import carry_explicit, was_explicit

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
    converted = getattr(trainer, "args", config)
    if config is not None and type(converted) is not type(config) and isinstance(converted, type(config)):
        carry_explicit(config, converted)  # TRL turned a TrainingArguments into its SFTConfig
    try:
        facts = gather_facts(trainer, bound, explicit_padding_free, settings)
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


def gather_facts(trainer, bound, explicit_padding_free, settings=None) -> planning.TrainerFacts:
    settings = settings or current()
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
        attention_blocker=_attention_blocker(model),
        prompt_learning=_prompt_learning(trainer.model),
        slow_attention=_slow_attention(trainer, model, text_config, settings.attention),
    )


def _attention_blocker(model):
    if "attention_interface" not in registry.applied_names():
        return None  # the < 4.51 path moves whole attention classes; legacy.blocker decides there
    from ..attention.capability import varlen_blocker

    return varlen_blocker(model)


def _prompt_learning(model):
    """The PEFT prompt-learning type of an active adapter (virtual tokens, prefixes), or None."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    active = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", None)]
    if callable(active):
        active = active()
    for name in active if isinstance(active, (list, tuple)) else [active]:
        config = configs.get(name)
        if config is not None and getattr(config, "is_prompt_learning", False):
            return str(getattr(getattr(config, "peft_type", None), "value", None) or type(config).__name__).lower()
    return None


def _compute_dtype(trainer, model):
    import torch

    if getattr(trainer.args, "bf16", False):
        return torch.bfloat16
    if getattr(trainer.args, "fp16", False):
        return torch.float16
    parameter = next(iter(model.parameters()), None)
    return parameter.dtype if parameter is not None else torch.float32


def _slow_attention(trainer, model, text_config, preference: str):
    """Why no varlen kernel beats the padded path on the training device, or None (rule: never slower)."""
    import torch

    from ..attention import backends

    device = torch.device(getattr(trainer.args, "device", "cpu"))
    head_dim = getattr(text_config, "head_dim", None)
    if not head_dim:
        hidden, heads = getattr(text_config, "hidden_size", None), getattr(text_config, "num_attention_heads", None)
        if not (isinstance(hidden, int) and isinstance(heads, int) and heads):
            return None  # not an attention model: the blockers say why
        head_dim = hidden // heads
    window = getattr(text_config, "sliding_window", None)
    softcap = getattr(text_config, "attn_logit_softcapping", None)
    dtype = _compute_dtype(trainer, model)
    # a forced backend that cannot run here is a clear error now, not in the first forward
    if backends.choose(preference, device, dtype, int(head_dim), window, softcap) != "masked":
        return None
    return (f"no varlen attention kernel here ({device.type}, {str(dtype).replace('torch.', '')}, head dim "
            f"{head_dim}) is faster than the padded path")


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


def prepare(trainer, plan: planning.Plan, settings) -> None:
    """Build what the plan needs for training; the trainer and the model stay as TRL made them.

    The padding-free collator serves the training dataloader only (evaluation and prediction keep
    TRL's batches, so predictions and metrics are shaped as stock); the model's edits (attention,
    fused layers) are applied for the duration of ``train()`` by ``training_edits``.
    """
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
    training_edits.install_collator(trainer, collator, train_collator)
    if plan.padding_free and plan.padding_free_reason.startswith("padding_free=True") and \
            hasattr(trainer, "padding_free"):
        object.__setattr__(trainer, "padding_free", True)  # the trainer says what its batches are
    if plan.padding_free:
        _log_truncation(trainer)


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
