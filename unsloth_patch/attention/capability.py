"""Can ``unsloth_varlen`` compute this model's attention exactly? A positive check.

transformers' attention modules (4.48+) compute ``softmax(Q Kᵀ · scaling + mask) V`` by handing
their projected states to one function from ``ALL_ATTENTION_FUNCTIONS``; whatever else shapes
the maths travels as keywords of that call (``sliding_window``, ``softcap``, ``s_aux`` for
attention sinks, ``position_bias``, ...). We accept a model only when every layer attends
through such a call and each call passes nothing but keywords our kernels implement. A model
that attends some other way, or passes anything else, keeps its own attention (and padded
batches), with the reason.
"""

from __future__ import annotations

import ast
import functools
from typing import Optional

from .. import source_ast

# Keywords of the attention call that our varlen path implements exactly.
SUPPORTED_KEYWORDS = frozenset({"dropout", "scaling", "sliding_window", "softcap", "position_ids"})
CALL_NAME = "attention_interface"


@functools.lru_cache(maxsize=256)
def call_sites(cls) -> Optional[tuple]:
    """``(positional count, keyword names, is_causal literal)`` of each attention call in ``cls.forward``.

    None when the class's forward has no readable source or makes no such call.
    """
    tree = source_ast.parsed(getattr(cls, "forward", None))
    if tree is None:
        return None
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called_name(node.func) == CALL_NAME:
            names, causal = [], None
            for keyword in node.keywords:
                if keyword.arg is None:
                    continue  # **kwargs: the model's own forward keywords (boundaries, positions)
                names.append(keyword.arg)
                if keyword.arg == "is_causal":
                    causal = keyword.value.value if isinstance(keyword.value, ast.Constant) else "dynamic"
            starred = any(isinstance(a, ast.Starred) for a in node.args)
            sites.append((-1 if starred else len(node.args), tuple(sorted(names)), causal))
    return tuple(sites) or None


def _called_name(func) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def site_blocker(cls) -> Optional[str]:
    """Why the attention calls of ``cls`` are not ours to take, or None (None also when it makes none)."""
    for positional, names, causal in call_sites(cls) or ():
        extra = sorted(set(names) - SUPPORTED_KEYWORDS - {"attention_mask", "is_causal"})
        if extra:
            return (f"{cls.__name__} passes {', '.join(extra)} to its attention function, which unsloth_varlen "
                    "does not implement" + (" (attention sinks)" if {"s_aux", "sinks"} & set(extra) else ""))
        if "is_causal" in names and causal is not True:
            return f"{cls.__name__} calls its attention with is_causal={causal!r}, not a plain causal mask"
        expected = 4 if "attention_mask" in names else 5
        if positional != expected:
            return f"{cls.__name__} calls its attention function with an unusual argument list"
    return None


def varlen_blocker(model) -> Optional[str]:
    """Why ``unsloth_varlen`` cannot reproduce ``model``'s attention exactly, or None."""
    counted = 0
    seen = {}
    for module in model.modules():
        cls = type(module)
        if cls not in seen:
            seen[cls] = site_blocker(cls) if call_sites(cls) else False
        verdict = seen[cls]
        if verdict is False:
            continue
        if verdict:
            return verdict
        counted += 1
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    if counted == 0:
        return "no attention module of this model calls transformers' attention interface"
    if isinstance(layers, int) and counted < layers:
        return f"only {counted} of its {layers} layers attend through transformers' attention interface"
    return None
