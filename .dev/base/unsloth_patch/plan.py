"""The per-trainer decision: padding-free or not, and which attention path, with reasons.

``decide`` is a pure function of the toggles and a few facts about the trainer, so the whole
policy reads (and is tested) here, apart from how the facts are gathered and applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from .errors import UnslothPatchError
from .settings import Settings

# Layers that carry state across tokens (recurrent / linear attention / SSM): flattening a batch
# would let that state flow from one sequence into the next.
STATEFUL_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "jamba", "zamba", "zamba2", "bamba", "nemotron_h", "falcon_h1",
    "granitemoehybrid", "qwen3_next", "lfm2", "lfm2_moe", "lfm2_vl", "rwkv", "recurrent_gemma", "plamo2",
    "minimax", "kimi_linear", "olmo3_hybrid", "xlstm", "mamba_ssm",
})
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "kernels-community")
REPLACEABLE_IMPLEMENTATIONS = ("sdpa", "eager", None)
LEGACY = "legacy-varlen"  # transformers < 4.51: FlashAttention-2 classes hosting our varlen attention


@dataclass(frozen=True)
class TrainerFacts:
    """What the plan needs to know about one ``SFTTrainer(...)`` call."""

    user_collator: Optional[str] = None  # class name of a collator the user passed
    user_collator_flattenable: bool = False  # a TRL/transformers LM collator we know how to flatten
    vision: Optional[str] = None  # why the data or processor is multimodal
    encoder_decoder: bool = False
    model_type: str = ""
    layer_types: tuple = ()
    packing: bool = False
    packing_padding_free: bool = False  # TRL's bfd/ffd packing: already flat, needs boundaries only
    padding_free_explicit: Optional[bool] = None  # the user's padding_free=..., None if left at default
    attn_implementation: Optional[str] = None
    attention_interface: bool = False  # our attention is registered (transformers >= 4.51)
    legacy_attention_blocker: Optional[str] = "not checked"  # None: the < 4.51 varlen path can serve
    packed_mask_detection: bool = False  # transformers' sdpa/eager isolate packed sequences on their own
    attention_blocker: Optional[str] = None  # why unsloth_varlen cannot reproduce this model's attention
    prompt_learning: Optional[str] = None  # PEFT adapter type that adds virtual tokens inside the forward
    slow_attention: Optional[str] = None  # why no varlen kernel beats the padded path on the training device
    packer: Optional[str] = None  # who packs, from packing_mode() before TRL's init: "trl", "ours" or None
    packing_wrapped: bool = False  # the user chose packing_strategy="wrapped" (rows attend across examples)
    packing_positions: bool = True  # TRL's packed batches carry position_ids (transformers can isolate them)


@dataclass
class Plan:
    """What the plugin does to one trainer, and why (also shown by the report)."""

    padding_free: bool = False
    padding_free_reason: str = ""
    boundaries_only: bool = False  # TRL packing: keep its batches, add cu_seq_lens
    attention: Optional[str] = None  # implementation to switch the model to, None = leave
    attention_reason: str = ""
    packer: Optional[str] = None  # who packs the rows, when packing is on
    packing_efficiency: Optional[float] = None  # real tokens / row capacity of the packed training data
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


_last: Optional[Plan] = None


def last_plan() -> Optional[Plan]:
    return _last


def remember(plan: Plan) -> None:
    global _last
    _last = plan


def padding_free_blocker(facts: TrainerFacts, settings: Settings) -> Optional[str]:
    """The first reason padding-free batches would be unsafe or unwanted, or None."""
    if facts.padding_free_explicit is False:
        return "padding_free=False was passed explicitly"
    if facts.user_collator and not facts.user_collator_flattenable:
        return f"a custom data_collator ({facts.user_collator}) was passed"
    if facts.vision:
        return facts.vision
    if facts.encoder_decoder:
        return f"encoder-decoder model ({facts.model_type})"
    if facts.prompt_learning:
        return (f"PEFT {facts.prompt_learning} adds virtual tokens inside the forward, so the batch's "
                "sequence boundaries would not cover the model's inputs")
    if facts.model_type in STATEFUL_MODEL_TYPES:
        return f"model type {facts.model_type!r} carries state across tokens"
    odd_layers = sorted(set(facts.layer_types) - ATTENTION_LAYER_TYPES)
    if odd_layers:
        return f"model has non-attention layers ({', '.join(odd_layers)}) that carry state across tokens"
    impl = facts.attn_implementation or "sdpa"
    if any(impl.startswith(f) for f in FLASH_IMPLEMENTATIONS):
        return None  # transformers' FlashAttention path reads the boundaries itself
    if impl not in REPLACEABLE_IMPLEMENTATIONS:
        return f"attention implementation {impl!r} was chosen explicitly and has no varlen path"
    if settings.attention == "off":
        if facts.packed_mask_detection:
            return None
        return (f"UNSLOTH_PATCH_ATTENTION=off and this transformers' {impl} attention would attend across "
                "sequences of a flattened batch")
    if not facts.attention_interface:
        if facts.legacy_attention_blocker is None:
            return None
        return ("this transformers has no AttentionInterface (needs >= 4.51), FlashAttention is not selected, "
                f"and its FlashAttention-2 classes cannot host our kernels ({facts.legacy_attention_blocker}), "
                f"so {impl} attention would attend across sequences of a flattened batch")
    if facts.attention_blocker:
        return f"the model's attention cannot be computed by our varlen path exactly: {facts.attention_blocker}"
    return None


def _slow_here(facts: TrainerFacts) -> bool:
    """No varlen kernel faster than the padded path will run (and transformers' flash path is not chosen)."""
    impl = facts.attn_implementation or "sdpa"
    return bool(facts.slow_attention) and not any(impl.startswith(f) for f in FLASH_IMPLEMENTATIONS)


OUR_PACKER = "unsloth_patch best-fit-decreasing"


def packing_mode(settings: Settings, requested: bool, boundary_packer: bool, wrapped: bool = False) -> Optional[str]:
    """Before TRL builds the trainer: who packs — ``"trl"``, ``"ours"`` or None (no packing).

    Packing is never turned on silently: only ``packing=True`` or ``UNSLOTH_PATCH_PACKING=on`` ask
    for it. Where TRL packs whole examples keeping their loss masks (0.20+) it packs; where it can
    only concatenate examples into one stream (before 0.19) or drops the masks (0.19), our packer
    does, unless batching is left untouched or the user chose TRL's ``wrapped`` strategy.
    """
    if not (requested or settings.packing == "on"):
        return None
    if boundary_packer or wrapped or settings.padding_free == "off":
        return "trl"
    return "ours"


def decide(settings: Settings, facts: TrainerFacts) -> Plan:
    """Decide the plan; raise ``UnslothPatchError`` when a toggle forces the impossible."""
    plan = Plan()
    if facts.packer == "ours":
        return _our_packing(settings, facts, plan)
    if facts.packing and facts.packing_wrapped:
        plan.padding_free_reason = ("packing_strategy='wrapped' kept as chosen: its rows concatenate examples, "
                                    "which attend to each other")
        return plan
    if facts.packing:
        if facts.packing_padding_free and settings.padding_free == "auto" and _slow_here(facts) \
                and facts.packed_mask_detection and facts.packing_positions:
            plan.packer = "TRL"
            plan.padding_free_reason = (f"TRL packing left as it is: {facts.slow_attention}, and transformers "
                                        "already isolates packed sequences")
        elif facts.packing_padding_free and settings.padding_free != "off" and not facts.prompt_learning:
            plan.boundaries_only = True
            plan.packer = "TRL"
            plan.padding_free_reason = "TRL packing builds padding-free rows; boundary metadata added"
            blocker = padding_free_blocker(facts, settings)
            if blocker is None:
                plan.attention, plan.attention_reason = _attention(settings, facts)
            else:
                plan.attention_reason = f"the model keeps its own attention: {blocker}"
        elif not facts.packing_padding_free:
            plan.padding_free_reason = "TRL's packing (wrapped rows) left as it is: its examples attend to each other"
        else:
            plan.padding_free_reason = f"TRL's packing left as it is ({_why_untouched(settings, facts)})"
        return plan
    if settings.padding_free == "off":
        plan.padding_free_reason = "UNSLOTH_PATCH_PADDING_FREE=off"
        return plan
    blocker = padding_free_blocker(facts, settings)
    if blocker is not None:
        if settings.padding_free == "on":
            raise UnslothPatchError(
                f"UNSLOTH_PATCH_PADDING_FREE=on, but padding-free batches are impossible here: {blocker}. "
                "Accepted: remove the blocker, or set UNSLOTH_PATCH_PADDING_FREE=auto (keeps padded batches) or off."
            )
        plan.padding_free_reason = f"padded batches kept: {blocker}"
        return plan
    if settings.padding_free == "auto" and not facts.padding_free_explicit and _slow_here(facts):
        plan.padding_free_reason = (f"padded batches kept: {facts.slow_attention} "
                                    "(UNSLOTH_PATCH_PADDING_FREE=on flattens anyway)")
        return plan
    plan.padding_free = True
    plan.padding_free_reason = ("padding_free=True was passed; batches flattened after TRL's truncation"
                                if facts.padding_free_explicit else "safe for this model and data")
    plan.attention, plan.attention_reason = _attention(settings, facts)
    return plan


def _why_untouched(settings: Settings, facts: TrainerFacts) -> str:
    if settings.padding_free == "off":
        return "UNSLOTH_PATCH_PADDING_FREE=off"
    return f"PEFT {facts.prompt_learning} adds virtual tokens inside the forward"


def _our_packing(settings: Settings, facts: TrainerFacts, plan: Plan) -> Plan:
    blocker = padding_free_blocker(facts, settings)
    if blocker is not None:
        if settings.padding_free == "on":
            raise UnslothPatchError(f"UNSLOTH_PATCH_PADDING_FREE=on, but packing without crossing examples is "
                                    f"impossible here: {blocker}.")
        plan.padding_free_reason = (f"packing requested, but {blocker}: examples are batched unpacked and padded "
                                    "(this TRL's own packing would let examples attend to each other)")
        return plan
    plan.padding_free = True
    plan.packer = OUR_PACKER
    plan.padding_free_reason = ("packing requested; this TRL packs by concatenating examples, so rows are packed "
                                "whole-example by our best-fit-decreasing packer, each example its own sequence")
    plan.attention, plan.attention_reason = _attention(settings, facts)
    return plan


def _attention(settings: Settings, facts: TrainerFacts):
    impl = facts.attn_implementation or "sdpa"
    if any(impl.startswith(f) for f in FLASH_IMPLEMENTATIONS):
        return None, f"kept the explicitly chosen {impl}"
    if settings.attention == "off":
        return None, f"UNSLOTH_PATCH_ATTENTION=off; {impl} isolates packed sequences with a dense mask"
    if not facts.attention_interface:
        if facts.legacy_attention_blocker is None:
            return LEGACY, f"{impl} replaced by the FlashAttention-2 classes running our varlen kernels (transformers < 4.51)"
        return None, "AttentionInterface unavailable"
    from .attention.dispatch import NAME

    return NAME, f"{impl} replaced by {NAME} (UNSLOTH_PATCH_ATTENTION={settings.attention})"
