"""A learning rate of their own for the input and output embeddings.

Continued pretraining and newly added tokens want ``embed_tokens``/``lm_head`` trained at a
different (usually smaller) rate than the rest of the model. The learning rate comes from,
in this order:

1. ``embedding_learning_rate=`` on the training config: TRL's own ``SFTConfig`` (this module
   adds a real dataclass field to it) or ``unsloth_patch.UnslothSFTConfig``;
2. the ``UNSLOTH_PATCH_EMBEDDING_LR`` environment variable.

When neither is set the patch does nothing at all: the handler calls the original.

How the optimizer is built
--------------------------
``Trainer.create_optimizer`` is wrapped, and the original still builds the optimizer. Stock
transformers (4.46 through 5.x) makes two groups, {decay, no-decay}, asks
``get_optimizer_cls_and_kwargs`` for the optimizer class and its keyword arguments, and, when
those keyword arguments carry ``params``, uses them instead of its own groups (the hook GaLore
uses). The handler computes four groups, {decay, no-decay} x {rest, embedding}, with the
trainer's own ``get_decay_parameter_names(model)``, and hands them to the original through
that hook: for the duration of the call the trainer instance gets a
``get_optimizer_cls_and_kwargs`` that calls the real one and adds ``params`` (or, on
transformers >= 4.57, the user's ``optimizer_cls_and_kwargs`` tuple gets ``params`` added).
So optimizer selection, its arguments, the bitsandbytes fp32 override for embeddings under
8-bit optimizers and SageMaker wrapping all stay transformers' own code, in every version,
whatever the signature of ``create_optimizer`` (``model=`` was added in 5.3).

Groups, in order: rest/decay and rest/no-decay (exactly stock's two groups minus the
embedding parameters, so indices 0 and 1 keep their meaning), then embedding/decay and
embedding/no-decay with ``lr`` set; an empty embedding group is left out. Only trainable
parameters are grouped, each exactly once (``named_parameters()`` yields a tied weight once).
Every group keeps stock's weight decay, so embeddings are not silently left undecayed. The LR
scheduler scales each group from its own initial learning rate.

Embedding parameters are found by module identity, starting from ``get_input_embeddings()``
and ``get_output_embeddings()``: the module's own weights, the trainable copies inside PEFT's
``ModulesToSaveWrapper`` and the token deltas of PEFT's trainable-token adapters. LoRA
factors placed *on* an embedding are adapter parameters and keep the main learning rate.

Left alone: an optimizer that already exists (``optimizers=(opt, sched)``), optimizers that
build their own groups (GaLore, LOMO, layer-wise, 5.x optimizer factories; one info line),
SageMaker model parallelism, and models without trainable embedding parameters.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Optional

import wrapt

from .. import log
from ..settings import PREFIX, current

FIELD = "embedding_learning_rate"
ENV_VARIABLE = PREFIX + "EMBEDDING_LR"
FIELD_HELP = (
    "Learning rate for the input and output embeddings (embed_tokens, lm_head, and PEFT's trainable "
    "copies of them). Unset: every parameter uses learning_rate. Environment fallback: " + ENV_VARIABLE + "."
)

# Keyword arguments through which get_optimizer_cls_and_kwargs supplies its own parameters.
_OWN_PARAMETERS = ("params", "model", "optimizer_dict")

try:  # errors meant for the user pass through the patches' failure containment
    from ..errors import UnslothPatchError as _UserError
except ImportError:  # pragma: no cover - older layouts
    _UserError = ValueError


class EmbeddingLearningRateError(_UserError):
    """An embedding learning rate that is not a positive finite number."""


# --------------------------------------------------------------------------- the value


def validate(value, source: str) -> float:
    """``value`` as a float, or an error naming ``source`` (where the value came from)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        reason = "it is not a number"
    elif math.isnan(value) or math.isinf(value) or value <= 0:
        reason = "it must be positive and finite"
    else:
        return float(value)
    raise EmbeddingLearningRateError(
        f"invalid embedding learning rate {value!r} from {source}: {reason} (e.g. 5e-5)."
    )


def resolve(args) -> tuple[Optional[float], str]:
    """(learning rate, where it came from) for training arguments ``args``; (None, "") when unset."""
    value = getattr(args, FIELD, None) if args is not None else None
    if value is not None:
        source = f"{type(args).__name__}({FIELD}=...)"
        return validate(value, source), source
    value = current().embedding_lr
    if value is not None:
        return validate(value, ENV_VARIABLE), ENV_VARIABLE
    return None, ""


# --------------------------------------------------------------------------- the config field


def install_config_field(resolved):
    """Give TRL's ``SFTConfig`` a real ``embedding_learning_rate`` dataclass field.

    The field is added to ``__dataclass_fields__`` (so ``dataclasses.fields``, ``to_dict()``,
    ``HfArgumentParser`` and ``dataclasses.replace`` see it) and to the class annotations, the
    class gets the default ``None``, and ``__init__`` is wrapped to accept and validate the keyword. Returns the
    function that puts the class back exactly as it was.
    """
    import dataclasses
    from typing import Optional as _Optional

    ((_, _, cls),) = resolved
    if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in vars(cls):
        raise LookupError(f"{cls.__qualname__} is not a dataclass")
    if "__init__" not in vars(cls):
        raise LookupError(f"{cls.__qualname__} has no __init__ of its own")
    fields = vars(cls)["__dataclass_fields__"]
    if FIELD in fields or FIELD in vars(cls):
        raise LookupError(f"{cls.__qualname__} already has {FIELD} (upstream now defines it)")

    spec = dataclasses.field(default=None, metadata={"help": FIELD_HELP})
    spec.name = FIELD
    spec.type = _Optional[float]
    spec._field_type = dataclasses._FIELD  # what @dataclass sets on a regular field
    if hasattr(spec, "kw_only"):
        spec.kw_only = True
    original_init = vars(cls)["__init__"]
    class_name = cls.__name__

    def accept(wrapped, instance, args, kwargs):
        value = kwargs.pop(FIELD, None)
        if value is not None:
            value = validate(value, f"{class_name}({FIELD}=...)")
        result = wrapped(*args, **kwargs)
        if instance is not None:
            object.__setattr__(instance, FIELD, value)
        return result

    init = wrapt.FunctionWrapper(original_init, accept)
    init._self_unsloth_patch = "embedding_lr_config"

    annotations = vars(cls).get("__annotations__")
    annotated = isinstance(annotations, dict) and FIELD not in annotations
    fields[FIELD] = spec
    if annotated:  # typing.get_type_hints (HfArgumentParser) reads the annotations
        annotations[FIELD] = _Optional[float]
    setattr(cls, FIELD, None)
    cls.__init__ = init

    def restore() -> None:
        cls.__init__ = original_init
        if FIELD in vars(cls):
            delattr(cls, FIELD)
        vars(cls)["__dataclass_fields__"].pop(FIELD, None)
        if annotated:
            annotations.pop(FIELD, None)

    return restore


# --------------------------------------------------------------------------- embedding parameters


def _embedding_modules(model) -> list:
    """The modules returned by get_input_embeddings()/get_output_embeddings() (distinct, not None)."""
    import torch.nn as nn

    found: list = []
    for candidate in (model, getattr(model, "module", None)):  # DDP/FSDP-style wrappers hold .module
        if candidate is None:
            continue
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            method = getattr(candidate, getter, None)
            if method is None:
                continue
            try:
                module = method()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(module, nn.Module) and all(module is not m for m in found):
                found.append(module)
        if found:
            break
    return found


def _members(module, depth: int = 0) -> list:
    """The tensors that *are* the embedding behind ``module``, looking through PEFT wrappers."""
    import torch.nn as nn

    if not isinstance(module, nn.Module) or depth > 8:
        return []
    out: list = []
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict):  # PEFT ModulesToSaveWrapper: frozen original + trainable copies
        out += _members(getattr(module, "original_module", None), depth + 1)
        for copy in copies.values():
            out += _members(copy, depth + 1)
        return out
    adapter = getattr(module, "token_adapter", None)
    if isinstance(adapter, nn.Module):  # PEFT TrainableTokensWrapper
        return _members(adapter, depth + 1)
    deltas = getattr(module, "trainable_tokens_delta", None)
    if isinstance(deltas, (nn.ParameterDict, nn.Module)):  # PEFT TrainableTokensLayer
        out += list(deltas.parameters())
        return out + _members(getattr(module, "base_layer", None), depth + 1)
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module):  # a tuner layer (LoRA, ...) on the embedding: its base weight only
        return _members(base, depth + 1)
    return list(module.parameters())


def embedding_parameter_ids(model) -> set:
    """ids of every tensor that belongs to the model's input or output embedding."""
    ids = set()
    for module in _embedding_modules(model):
        ids.update(id(p) for p in _members(module))
    return ids


def build_groups(trainer, model, learning_rate: float) -> tuple[list, int, int]:
    """Stock's {decay, no-decay} groups, each split into rest and embedding.

    Returns (groups, embedding tensors, embedding elements); no groups when the model has no
    trainable embedding parameter.
    """
    decay_names = set(trainer.get_decay_parameter_names(model))
    embedding_ids = embedding_parameter_ids(model)
    weight_decay = trainer.args.weight_decay
    rest_decay, rest_plain, emb_decay, emb_plain = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_ids:
            (emb_decay if name in decay_names else emb_plain).append(param)
        else:
            (rest_decay if name in decay_names else rest_plain).append(param)
    embedding = emb_decay + emb_plain
    if not embedding:
        return [], 0, 0
    groups = [
        {"params": rest_decay, "weight_decay": weight_decay},
        {"params": rest_plain, "weight_decay": 0.0},
    ]
    if emb_decay:
        groups.append({"params": emb_decay, "weight_decay": weight_decay, "lr": learning_rate})
    if emb_plain:
        groups.append({"params": emb_plain, "weight_decay": 0.0, "lr": learning_rate})
    groups = _split_meshes(groups)
    return groups, len(embedding), sum(p.numel() for p in embedding)


def _split_meshes(groups: list) -> list:
    """transformers 5.x gives each device mesh its own group (expert parallelism); do the same."""
    trainer_module = sys.modules.get("transformers.trainer")
    mixed = getattr(trainer_module, "has_mixed_dtensor", None)
    if mixed is None or not mixed(p for g in groups for p in g["params"]):
        return groups
    from torch.distributed.tensor import DTensor

    split = []
    for group in groups:
        by_mesh: dict = {}
        for p in group["params"]:
            by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        split.extend({**group, "params": params} for params in by_mesh.values())
    return split


# --------------------------------------------------------------------------- the handler


def _builds_own_groups(optimizer_cls, optimizer_kwargs) -> bool:
    if any(key in optimizer_kwargs for key in _OWN_PARAMETERS):
        return True
    is_factory = getattr(sys.modules.get("transformers.trainer"), "is_optimizer_factory", None)
    try:
        return bool(is_factory and is_factory(optimizer_cls))
    except Exception:
        return False


def _sagemaker_mp() -> bool:
    check = getattr(sys.modules.get("transformers.trainer"), "is_sagemaker_mp_enabled", None)
    try:
        return bool(check and check())
    except Exception:
        return False


def handle_create_optimizer(proceed, instance, args, kwargs):
    """Wraps ``Trainer.create_optimizer(self[, model])``."""
    if getattr(instance, "optimizer", None) is not None:
        return proceed(*args, **kwargs)  # a user-supplied optimizer, or one built already
    learning_rate, source = resolve(getattr(instance, "args", None))
    if learning_rate is None or _sagemaker_mp():
        return proceed(*args, **kwargs)

    model = kwargs.get("model", args[0] if args else None)
    opt_model = instance.model if model is None else model
    groups, tensors, elements = build_groups(instance, opt_model, learning_rate)
    if not groups:
        log.logger.info("embedding learning rate %g (from %s) not applied: the model has no trainable "
                        "embedding parameters", learning_rate, source)
        return proceed(*args, **kwargs)

    outcome: dict = {}

    def with_groups(optimizer_cls, optimizer_kwargs):
        if _builds_own_groups(optimizer_cls, optimizer_kwargs):
            outcome["ignored"] = getattr(optimizer_cls, "__name__", repr(optimizer_cls))
            return optimizer_cls, optimizer_kwargs
        outcome["used"] = True
        return optimizer_cls, {**optimizer_kwargs, "params": groups}

    user_choice = getattr(instance, "optimizer_cls_and_kwargs", None)
    if user_choice is not None:  # transformers >= 4.57: Trainer(optimizer_cls_and_kwargs=...)
        optimizer_cls, optimizer_kwargs = user_choice
        instance.optimizer_cls_and_kwargs = with_groups(optimizer_cls, dict(optimizer_kwargs))
        try:
            result = proceed(*args, **kwargs)
        finally:
            instance.optimizer_cls_and_kwargs = user_choice
    else:
        had_own = "get_optimizer_cls_and_kwargs" in vars(instance)
        real = instance.get_optimizer_cls_and_kwargs

        def get_optimizer_cls_and_kwargs(*call_args, **call_kwargs):
            return with_groups(*real(*call_args, **call_kwargs))

        instance.get_optimizer_cls_and_kwargs = get_optimizer_cls_and_kwargs
        try:
            result = proceed(*args, **kwargs)
        finally:
            if had_own:
                instance.get_optimizer_cls_and_kwargs = real
            else:
                del instance.get_optimizer_cls_and_kwargs

    if "ignored" in outcome:
        log.logger.info("embedding learning rate %g (from %s) not applied: optimizer %s builds its own "
                        "parameter groups", learning_rate, source, outcome["ignored"])
    elif outcome.get("used"):
        log.logger.info("embedding learning rate %g (from %s) for %d embedding parameters in %d tensors; "
                        "the others keep learning rate %g", learning_rate, source, elements, tensors,
                        instance.args.learning_rate)
    return result


__all__ = [
    "FIELD",
    "ENV_VARIABLE",
    "EmbeddingLearningRateError",
    "validate",
    "resolve",
    "install_config_field",
    "embedding_parameter_ids",
    "build_groups",
    "handle_create_optimizer",
]
