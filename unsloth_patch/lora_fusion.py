"""PEFT LoRA layers run as one autograd node each, and sibling projections of one input as one node.

While ``train()`` runs, each of PEFT's plain LoRA ``Linear`` layers that qualifies gets an instance
``forward`` that computes what PEFT's would (base output plus ``lora_B(lora_A(dropout(x))) * scaling``,
in the autocast dtype) through ``kernels/lora_linear.projections``: fewer kernels and nodes than PEFT's
seven of each, no ``* scaling`` and addition over the whole output, and no float32 copy of the input.

Siblings that their parent's forward calls with the same argument (``self.q_proj(hidden_states)``,
``self.k_proj(hidden_states)``, ``self.v_proj(hidden_states)`` in Llama-style attention;
``gate_proj(x)``, ``up_proj(x)`` in a gated MLP, found on the class forward's source) form a group:
the first member called computes every member's output in one node (the adapters' down projections
in one matmul that reads the input once) and leaves the others' outputs for their own calls,
which take them only when called with the very same tensor. Anything else (another input, a
member no longer eligible, a replica made by ``nn.DataParallel``) computes that member alone.

A layer qualifies when its base layer is a plain ``nn.Linear`` (bias allowed), exactly one vanilla
adapter is active (not DoRA or another variant, not merged, adapters enabled), its dropout is
``nn.Identity`` or ``nn.Dropout`` (a dropout > 0 layer is fused alone, with PEFT's own mask) and
no hooks sit on it or its parts. Each call re-checks what can change during training (adapter
state, scaling, dropout, hooks) and hands anything else, extra arguments and ``torch.compile``
tracing included, to PEFT's forward. ``UNSLOTH_PATCH_KERNELS_OFF=lora`` turns this off.
"""

from __future__ import annotations

import ast
import functools
import types
from typing import Optional

from . import fallback, source_ast
from .lora_inputs import LORA_LINEAR, autocast_state, is_lora_layer

_LORA_4BIT = ("peft.tuners.lora.bnb", "Linear4bit")  # PEFT's LoRA layer on a bitsandbytes 4-bit base

FUSED_LORA = "fused LoRA projections"
GROUP = "_unsloth_lora_group"
_last: dict = {"fused": 0, "grouped": 0, "kept": {}, "reason": "not run yet"}


def last() -> dict:
    """What the most recent ``train()`` did: ``fused`` layers, of them ``grouped`` with siblings, ``kept``: name -> why."""
    return {"fused": _last["fused"], "grouped": _last["grouped"], "kept": dict(_last["kept"]), "reason": _last["reason"]}


def remember(outcome: dict) -> None:
    global _last
    _last = {"fused": outcome.get("fused", 0), "grouped": outcome.get("grouped", 0),
             "kept": dict(outcome.get("kept", {})), "reason": outcome["reason"]}


# ----------------------------------------------------------------------------- reading a layer


_LINEAR: list = []  # torch.nn.Linear, looked up once (this runs on every fused forward)


def plain_linear_reason(module, bias: bool) -> Optional[str]:
    """Why ``module`` is not a plain ``nn.Linear`` (with a bias only if ``bias``) without hooks; None if it is."""
    if not _LINEAR:
        import torch

        _LINEAR.append(torch.nn.Linear)
    if type(module) is not _LINEAR[0]:
        return f"{type(module).__name__} is not a plain nn.Linear"
    if not bias and module._parameters["bias"] is not None:
        return "has a bias"
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks"
    return None


_KINDS: dict = {}  # class -> "plain" (PEFT's LoRA Linear), "4bit" (its Linear4bit) or "" (neither)


def _kind(cls) -> str:
    kind = _KINDS.get(cls)
    if kind is None:
        key = (cls.__module__, cls.__name__)
        kind = _KINDS[cls] = "4bit" if key == _LORA_4BIT else ("plain" if key == LORA_LINEAR else "")
    return kind


def is_lora_4bit(module) -> bool:
    return _kind(type(module)) == "4bit"


def _four_bit_base(base, bias: bool):
    """``(Projection of the packed weight, None)`` for a bitsandbytes ``Linear4bit`` base, else ``(None, why)``."""
    from .kernels.projection import Projection

    if type(base).__name__ != "Linear4bit" or not type(base).__module__.startswith("bitsandbytes."):
        return None, f"{type(base).__name__} is not bitsandbytes' Linear4bit"
    if base._forward_hooks or base._forward_pre_hooks:
        return None, "has forward hooks"
    if base.bias is not None and not bias:
        return None, "has a bias"
    state = getattr(base.weight, "quant_state", None)
    if state is None or getattr(state, "shape", None) is None or getattr(state, "dtype", None) is None:
        return None, "its 4-bit weight has no quantisation state yet (not on its device)"
    compute = getattr(base, "compute_dtype", None)
    if compute is not None and compute != state.dtype:
        return None, f"computes in {compute}, its weight dequantises to {state.dtype} (fused when they agree)"
    return Projection(base.weight, bias=base.bias, quant_state=state), None


def read(module, bias: bool = True):
    """``(Projection, dropout, None)`` for what ``module`` computes now (dropout: an ``nn.Dropout`` the adapter's
    input goes through, or None), else ``(None, None, why not)``. Plain ``nn.Linear`` or PEFT's plain or 4-bit
    LoRA ``Linear``; reads the module's current state (adapters enabled, merged, active, scaling, hooks).
    Called on every fused forward, so it reads the modules' own dicts rather than through ``nn.Module``'s
    attribute lookup."""
    import torch

    from .kernels.projection import Projection

    kind = _kind(type(module))
    if not kind:
        why = plain_linear_reason(module, bias)
        return (None, None, why) if why else (Projection(module.weight, bias=module.bias), None, None)
    if module._forward_hooks or module._forward_pre_hooks:
        return None, None, "the LoRA layer has forward hooks"
    children = module._modules
    base = children["base_layer"]
    if kind == "4bit":
        base_part, why = _four_bit_base(base, bias)
    else:
        why = plain_linear_reason(base, bias)
        base_part = None
    if why:
        return None, None, f"its base layer {why}"
    state = module.__dict__
    if state.get("_disable_adapters", True) or state.get("merged_adapters", True):
        return None, None, "adapters disabled or merged"
    active = state.get("_active_adapter")
    if active is None:
        return None, None, "this PEFT keeps no _active_adapter"
    adapters_a = children["lora_A"]._modules
    if isinstance(active, str):
        name = active if active in adapters_a else None
    else:
        present = [n for n in active if n in adapters_a]
        name = present[0] if len(present) == 1 else None
        if name is None:
            return None, None, f"{len(present)} active adapters (one is fused)"
    if name is None:
        return None, None, "0 active adapters (one is fused)"
    if name in (state.get("lora_variant") or {}) or (state.get("use_dora") or {}).get(name):
        return None, None, "a LoRA variant (e.g. DoRA): left to PEFT"
    dropout = children["lora_dropout"]._modules[name]
    if type(dropout) is torch.nn.Identity:
        dropout = None
    elif type(dropout) is not torch.nn.Dropout or dropout._forward_hooks or dropout._forward_pre_hooks:
        return None, None, f"its dropout is {type(dropout).__name__} (nn.Identity or nn.Dropout are fused)"
    elif not callable(getattr(type(module), "_cast_input_dtype", None)):
        return None, None, "lora_dropout > 0 on a PEFT without _cast_input_dtype (its input cast is not known)"
    a, b = adapters_a[name], children["lora_B"]._modules[name]
    for part, layer in (("lora_A", a), ("lora_B", b)):
        why = plain_linear_reason(layer, bias=False)
        if why:
            return None, None, f"its {part} {why}"
    scaling = float(state["scaling"][name])
    if base_part is None:
        parameters = base._parameters
        return (Projection(parameters["weight"], a._parameters["weight"], b._parameters["weight"], scaling,
                           parameters["bias"]), dropout, None)
    return base_part._replace(lora_a=a._parameters["weight"], lora_b=b._parameters["weight"], scaling=scaling), \
        dropout, None


def compute_dtype(x, parts):
    """The dtype PEFT's layers compute ``parts`` in for input ``x``: autocast's, or the one dtype of ``x`` and every
    tensor; None when this torch cannot say or, without autocast, the dtypes are mixed (PEFT would mix them)."""
    on, autocast_dtype = autocast_state(x.device.type)
    if on is None:
        return None
    if on:
        return autocast_dtype
    dtypes = {t.dtype for p in parts for t in (p.lora_a, p.lora_b, p.bias) if t is not None}
    dtypes.update(p.weight_dtype for p in parts)
    return x.dtype if dtypes == {x.dtype} else None


# ----------------------------------------------------------------------------- the fused forward


class _Group:
    """Sibling layers called with one input; ``pending``: (input, its version, {member: output}) left by the
    member that ran, for the others' calls with that same, unmodified input."""

    __slots__ = ("members", "pending")

    def __init__(self, members):
        self.members = tuple(members)
        self.pending = None


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def _fused_forward(self, x, *args, **kwargs):
    import torch

    if args or kwargs or type(x) is not torch.Tensor:  # adapter_names (mixed batches), subclasses: PEFT's
        return type(self).forward(self, x, *args, **kwargs)
    group = self.__dict__.get(GROUP)
    if group is not None:
        pending = group.pending
        if pending is not None and pending[0] is x and pending[1] == x._version:
            out = pending[2].pop(self, None)
            if not pending[2]:
                group.pending = None
            if out is not None:
                return out
    if not fallback.enabled(FUSED_LORA) or _compiling():
        return type(self).forward(self, x)
    part, dropout, why = read(self)
    dtype = None if why else compute_dtype(x, (part,))
    if dtype is None:
        return type(self).forward(self, x)
    try:
        from .kernels.lora_linear import projections

        if dropout is not None:  # the adapter's input as PEFT makes it, so that the dropout draws PEFT's mask
            four_bit_under_autocast = part.quant_state is not None and torch.is_autocast_enabled()  # PEFT's test
            lora_x = x if four_bit_under_autocast else self._cast_input_dtype(x, part.lora_a.dtype)
            return projections(x, (part,), dtype, lora_input=dropout(lora_x))[0]
        if group is None or not any(member is self for member in group.members):
            return projections(x, (part,), dtype)[0]
        return _run_group(self, group, x, part, dtype)
    except Exception as exc:
        if fallback.propagates(exc):
            raise
        fallback.failed(FUSED_LORA, exc, "PEFT's own LoRA forward")
        return type(self).forward(self, x)


def _run_group(self, group, x, part, dtype):
    from .kernels.lora_linear import projections

    members, parts = [self], [part]
    for member in group.members:
        if member is self:
            continue
        other, dropout, why = read(member)
        if why is None and dropout is None:
            members.append(member)
            parts.append(other)
    if len(members) == 1 or compute_dtype(x, parts) != dtype:
        return projections(x, (part,), dtype)[0]
    outputs = projections(x, parts, dtype)
    group.pending = (x, x._version, dict(zip(members[1:], outputs[1:])))
    return outputs[0]


def is_fused(module) -> bool:
    return getattr(vars(module).get("forward"), "__func__", None) is _fused_forward


# ----------------------------------------------------------------------------- wiring


@functools.lru_cache(maxsize=128)
def _sibling_calls(cls) -> tuple:
    """Groups of child names that ``cls.forward`` calls as ``self.<child>(<same single argument>)``."""
    function = source_ast.definition(cls.forward)
    if function is None:
        return ()
    by_argument: dict = {}
    for node in ast.walk(function):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"
                and len(node.args) == 1 and not node.keywords and not isinstance(node.args[0], ast.Starred)):
            names = by_argument.setdefault(ast.unparse(node.args[0]), [])
            if node.func.attr not in names:
                names.append(node.func.attr)
    return tuple(tuple(names) for names in by_argument.values() if len(names) > 1)


def fuse(model, edits) -> dict:
    """Give every eligible LoRA layer of ``model`` the fused forward and group siblings, through ``edits``;
    ``{"fused": n, "grouped": m, "kept": {name: why}, "reason": ...}``."""
    fused, kept = {}, {}
    for name, module in model.named_modules():
        if not is_lora_layer(module):
            continue
        if is_fused(module):
            fused[id(module)] = module
            continue
        part, _, why = read(module) if _kind(type(module)) else (None, None, "")
        if part is None:
            kept[name] = why or (f"{type(module).__module__}.{type(module).__name__} is not PEFT's plain or 4-bit "
                                 "LoRA Linear")
            continue
        edits.setattr(module, "forward", types.MethodType(_fused_forward, module))
        fused[id(module)] = module
    grouped = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in _sibling_calls(type(parent)):
            members = [children[n] for n in names if id(children.get(n)) in fused]
            if len(members) > 1 and GROUP not in vars(members[0]):
                group = _Group(members)
                for member in members:
                    edits.setattr(member, GROUP, group)
                grouped += len(members)
    reason = "fused" if fused else ("no eligible LoRA layer" if kept else "no LoRA layer")
    return {"fused": len(fused), "grouped": grouped, "kept": kept, "reason": reason}
