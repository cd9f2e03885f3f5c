"""The ``mlp_recompute`` checkpointing policy, MLP side: which MLPs run chunked, and when a recomputation stops.

Under plain (full) checkpointing a layer's backward first reruns its forward to get back what
autograd saved, the MLP's gate, up and product included, and then holds their gradients too: at a
LoRA step's peak these are the largest tensors on the card (``kernels/chunked_mlp.py``). Under
``mlp_recompute`` the layers are checkpointed the same way, but each eligible MLP keeps only its
input and recomputes its intermediates chunk by chunk in its own backward. The layer's
recomputation then has nothing to rebuild past the MLP's input: the MLP's forward there returns
at once (its output feeds only the residual add, which saves nothing), and PyTorch's
non-reentrant checkpoint stops the recomputation there. Per layer the MLP's projections run three
times (forward, backward recompute, backward) instead of four, and a step holds one chunk of
intermediates instead of a layer's.

An MLP is eligible when it is one of our fused gated MLPs, its parent layer's forward uses the MLP
output only in additions (``mlp_is_last``: Llama, Mistral, Qwen2, Qwen3, Gemma; not Gemma2, whose
post-feed-forward norm saves the MLP output), and each projection is a bias-free ``nn.Linear`` or
PEFT's plain or 4-bit LoRA ``Linear`` with one active vanilla adapter, no dropout, no hooks
(``lora_fusion.read``). Anything else
keeps the module path. The checkpoint function (``checkpointing/functions.py``) says, around each
layer call, whether it is the forward or the recomputation (``layer_call``).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import threading
from typing import Optional

from . import lora_fusion, source_ast

MARK = "_unsloth_mlp_last"  # set on a fused MLP whose layer uses its output only in additions
CHUNK = "_unsloth_mlp_chunk"  # tokens per chunk, set for a run whose budget leaves room (checkpointing/mlp_chunk.py)
_state = threading.local()  # the backward's recomputation runs on autograd's device thread


@contextlib.contextmanager
def layer_call(recomputing: bool):
    """Around one checkpointed layer call: eligible MLPs inside run chunked, and return at once when recomputing."""
    previous = getattr(_state, "phase", None)
    _state.phase = "recompute" if recomputing else "forward"
    try:
        yield
    finally:
        _state.phase = previous


def phase() -> Optional[str]:
    """``"forward"``, ``"recompute"`` inside a ``layer_call``; None elsewhere."""
    return getattr(_state, "phase", None)


@functools.lru_cache(maxsize=64)
def mlp_is_last(cls) -> bool:
    """Whether ``cls.forward`` calls ``self.mlp`` once, as a statement of its own, and calls nothing after it
    (the output goes only into additions and the return): then nothing after the MLP saves a tensor."""
    function = source_ast.definition(cls.forward)
    if function is None:
        return False

    def calls_mlp(node) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "mlp"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "self")

    body = function.body
    at = [i for i, statement in enumerate(body) if any(calls_mlp(n) for n in ast.walk(statement))]
    if len(at) != 1 or not (isinstance(body[at[0]], ast.Assign) and calls_mlp(body[at[0]].value)):
        return False
    return not any(isinstance(n, ast.Call) for statement in body[at[0] + 1:] for n in ast.walk(statement))


def projection_of(module):
    """``(Projection, None)`` for a projection the chunked MLP computes exactly as the module does, else
    ``(None, why not)``. Reads the module's current state (adapters enabled, merged, active)."""
    part, dropout, why = lora_fusion.read(module, bias=False)
    if why:
        return None, why
    if dropout is not None:
        return None, "lora_dropout > 0"
    return part, None


def forward(mlp, x):
    """The MLP's output through the chunked path inside a ``layer_call``, or None (the module path runs)."""
    current = phase()
    if current is None or not getattr(mlp, MARK, False):
        return None
    projections = [projection_of(getattr(mlp, name))[0] for name in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None for p in projections):
        return None
    dtype = lora_fusion.compute_dtype(x, projections)
    if dtype is None:
        return None
    from .kernels import chunked_mlp

    chunk = getattr(mlp, CHUNK, None) or chunked_mlp.CHUNK_TOKENS
    return chunked_mlp.chunked_gated_mlp(x, *projections, activation=mlp._unsloth_activation, dtype=dtype,
                                         chunk=chunk, skip=current == "recompute")


def available(model) -> tuple:
    """``(eligible MLP count, why not)``: the policy is offered when every fused gated MLP of ``model`` is
    eligible (why not is then ""); otherwise the first reason found."""
    count = 0
    for name, module in model.named_modules():
        if getattr(module, "_unsloth_activation", None) is None or "forward" not in vars(module):
            continue
        if not getattr(module, MARK, False):
            return 0, f"{name}: its layer uses the MLP output beyond a residual add"
        for projection in ("gate_proj", "up_proj", "down_proj"):
            _, why = projection_of(getattr(module, projection))
            if why:
                return 0, f"{name}.{projection}: {why}"
        count += 1
    if not count:
        return 0, "no fused gated MLP (fused kernels off, not on a GPU, or no Llama-style MLP)"
    return count, ""


def default_chunk() -> int:
    """The chunk, in tokens, an MLP runs with unless a run sets its own (what the probe measures)."""
    from .kernels import chunked_mlp

    return chunked_mlp.CHUNK_TOKENS


def marked(model) -> list:
    """The MLPs of ``model`` that run chunked under ``mlp_recompute`` and ``offload``."""
    return [m for m in model.modules() if getattr(m, MARK, False) and getattr(m, "_unsloth_activation", None)]


def bytes_per_token(model, itemsize: int) -> int:
    """What one token of a chunk holds at its peak, in intermediate-wide tensors of ``itemsize`` bytes, for the
    widest marked MLP (0 when there is none): three, adapters or not (``kernels/chunked_mlp.py``: the gate, up and
    product of the forward; in the backward the product is freed before its gradient is formed). Before the
    eighth session a chunk held four, and LoRA and QLoRA chunks a fifth at the down projection (measured on an
    H100 in the seventh, 18-20 KB a token more than four tensors' 64 KiB at width 8192).
    ``tests/test_mlp_recompute.py`` counts the live tensors."""
    widths = [getattr(getattr(m, "gate_proj", None), "out_features", 0) or 0 for m in marked(model)]
    return TENSORS_PER_TOKEN * max(widths, default=0) * itemsize


TENSORS_PER_TOKEN = 3  # intermediate-wide tensors one chunk token holds at its peak


def set_chunk(model, tokens: int, edits) -> int:
    """Run each marked MLP of ``model`` in chunks of ``tokens`` tokens, through ``edits``; returns how many."""
    modules = marked(model)
    for module in modules:
        edits.setattr(module, CHUNK, int(tokens))
    return len(modules)


def mark_last_mlps(model, edits, fused_mlp) -> int:
    """Mark, through ``edits``, each fused MLP (``fused_mlp(module)``) whose parent layer's forward ends with it."""
    marked = 0
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if mlp is not None and fused_mlp(mlp) and mlp_is_last(type(module)):
            edits.setattr(mlp, MARK, True)
            marked += 1
    return marked
