"""What the plan needs to know about one ``SFTTrainer(...)``: facts gathered from the built trainer.

Kept apart from the wiring (``sft_trainer_init``) so that what is looked at, and how, reads in one
place; ``plan.decide`` turns these facts into the plan.
"""

from __future__ import annotations

from .. import plan as planning, registry
from ..settings import current

VISION_COLUMNS = ("image", "images", "video", "videos", "pixel_values")
PACKING_PADDING_FREE = ("bfd", "bfd_split", "ffd")


def gather_facts(trainer, bound, explicit_padding_free, settings=None, packer=None) -> planning.TrainerFacts:
    settings = settings or current()
    config = trainer.args
    model = base_model(trainer.model)
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
        packer=packer,
        packing_wrapped=packing and strategy == "wrapped" and _explicit(config, "packing_strategy"),
        packing_positions=packing and _returns_positions(trainer),
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


def base_model(model):
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


def _returns_positions(trainer) -> bool:
    """Whether TRL's packed batches carry ``position_ids`` (so transformers can isolate the sequences).

    Asked of the collator itself, on the first two packed rows: TRL 0.19-0.23 drop them on sdpa.
    """
    dataset = trainer.train_dataset
    try:
        rows = [dataset[i] for i in range(min(2, len(dataset)))]
        return "position_ids" in trainer.data_collator(rows)
    except Exception:
        return False  # unknown: take the side that adds boundaries


def _explicit(config, name) -> bool:
    from .config_fields import was_explicit

    return was_explicit(config, name) is not False


def boundary_packer(config_cls) -> bool:
    """Whether this TRL packs whole examples with their boundaries and loss masks.

    A best/first-fit ``packing_strategy`` keeps boundaries (0.19+); TRL 0.19 packs ``input_ids``
    alone, dropping ``completion_mask``/``assistant_masks`` (0.20 keeps them).
    """
    import dataclasses

    from ..versions import at_least

    fields = {f.name: f for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else {}
    strategy = fields.get("packing_strategy")
    return strategy is not None and strategy.default in PACKING_PADDING_FREE and at_least("trl", "0.20")


def max_length_of(args):
    """The run's length limit, whichever TRL spells it (``max_length``, or ``max_seq_length`` before 0.16)."""
    return getattr(args, "max_length", None) or getattr(args, "max_seq_length", None)


def dataset_lengths(dataset):
    """Token count of every example of a tokenized ``datasets.Dataset`` (None when it is not one)."""
    try:
        import pyarrow.compute as pc

        column = dataset.data.column("input_ids")
        return [int(n) for n in pc.list_value_length(column).to_pylist()]
    except Exception:
        return None
