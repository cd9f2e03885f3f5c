"""One linear projection as the fused kernels take it: a base weight (plain, or bitsandbytes 4-bit with its
quantisation state), an optional bias and LoRA adapter.

A 4-bit weight is dequantised each time a projection runs (forward, backward, and the recomputation
under checkpointing). With double quantisation (QLoRA's default) bitsandbytes first dequantises the
weight's block scales (``absmax``, 8-bit themselves) on every call: three more launches and their
Python per projection, on a step that is bound by the host's launch work. The scales of a frozen
base never change, so they are dequantised once per quantisation state and kept (float32, one value a
block: 4 bytes per 64 weights, 3% of the bf16 weights' size) while the state lives; the weight is
then dequantised by bitsandbytes' own kernel from exactly the values it would have computed.

Where memory allows (the checkpointing decision says so: ``checkpointing/dense_4bit.py``), the dense
weights themselves are kept for the length of a ``train()`` (:func:`keeping_dense`): every 4-bit
projection is then dequantised once per run instead of two or three times per step. The kept copy is
bitsandbytes' own output, so the step computes the same numbers; the copies go when ``train()`` returns.

Where no copy is kept, :func:`base_product` and :func:`base_input_grad` can instead run our fused kernels
(``linear_4bit``: tiles dequantised inside the matmul, no 16-bit copy), when ``UNSLOTH_PATCH_MATMUL_4BIT=fused``
asks for them (:func:`fusing_4bit`, for the length of a ``train()``); ``matmul_4bit_plan`` decides per weight.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch

from ..matmul_4bit_plan import FUSED, Facts, choose

__all__ = ["Projection", "dense_weight", "absmax_cache_bytes", "keeping_dense", "kept_dense_count", "base_product",
           "base_input_grad", "fusing_4bit", "matmul_4bit_choices"]


class Projection(NamedTuple):
    """``x @ weight.T (+ bias)`` plus ``(x @ lora_a.T) @ lora_b.T * scaling`` when adapted."""

    weight: torch.Tensor  # [out, in]
    lora_a: Optional[torch.Tensor] = None  # [rank, in]
    lora_b: Optional[torch.Tensor] = None  # [out, rank]
    scaling: float = 1.0
    bias: Optional[torch.Tensor] = None  # [out]
    quant_state: object = None  # bitsandbytes' QuantState when ``weight`` holds packed 4-bit values

    @property
    def in_features(self) -> int:
        return self.quant_state.shape[-1] if self.quant_state is not None else self.weight.shape[-1]

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the base weight computes in (a 4-bit weight's: the one it dequantises to)."""
        return self.quant_state.dtype if self.quant_state is not None else self.weight.dtype


def dense_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The base weight in ``dtype``: a 4-bit one dequantised by bitsandbytes (bit for bit what its layer uses)."""
    if quant_state is None:
        return weight.to(dtype)
    if not _KEEP_DENSE[0] or torch.is_inference_mode_enabled() or weight.is_inference():
        return _dequantized(weight, quant_state, dtype)
    return _kept(weight, quant_state, dtype)


class _Kept(NamedTuple):
    state: weakref.ref  # the quantisation state the copy was made with
    weight: weakref.ref  # the packed tensor itself (an address can be reused by another one)
    version: int  # the packed tensor's version then: an in-place change makes a new copy
    dense: torch.Tensor


def _kept(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """One dense copy per 4-bit weight (another dtype replaces it: the memory decision counts one each)."""
    key = id(quant_state)  # keyed by identity: QuantState defines == and is not hashable
    hit = _DENSE.get(key)
    if (hit is not None and hit.state() is quant_state and hit.weight() is weight and hit.version == weight._version
            and hit.dense.dtype == dtype):
        return hit.dense
    out = _dequantized(weight, quant_state, dtype)

    def drop(ref, key=key):  # the state or the packed tensor is gone: so is its copy (a newer entry stays)
        entry = _DENSE.get(key)
        if entry is not None and (entry.state is ref or entry.weight is ref):
            del _DENSE[key]

    _DENSE[key] = _Kept(weakref.ref(quant_state, drop), weakref.ref(weight, drop), weight._version, out)
    return out


def _dequantized(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    op = _dequantize_op()
    if op is None or not _kernel_takes(weight, quant_state):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight, quant_state).to(dtype)
    out = op(weight, _absmax(quant_state), quant_state.blocksize, quant_state.quant_type, quant_state.shape,
             quant_state.dtype)
    return out.to(dtype)


_KEEP_DENSE = [False]  # set by keeping_dense() for the length of a train()
_DENSE: dict = {}  # id(quant state) -> _Kept


def keeping_dense(on: bool) -> None:
    """Keep each 4-bit weight's dense copy once made (``on``), or stop and let every kept copy go."""
    _KEEP_DENSE[0] = bool(on)
    if not on:
        _DENSE.clear()


def kept_dense_count() -> int:
    """How many dense 4-bit weights are kept now."""
    return len(_DENSE)


_OP: list = []  # bitsandbytes' dequantisation kernel (torch.ops.bitsandbytes.dequantize_4bit), looked up once
_ABSMAX: dict = {}  # id(quant state) -> (weak reference to it, its absmax tensor, that tensor's version, float32 scales)


def _dequantize_op():
    if not _OP:
        try:
            _OP.append(torch.ops.bitsandbytes.dequantize_4bit.default)
        except (AttributeError, RuntimeError):
            _OP.append(None)
    return _OP[0]


def _kernel_takes(weight, state) -> bool:
    """What bitsandbytes' ``dequantize_4bit`` checks before its kernel, and the packed layout it keeps as is."""
    return (weight.dim() == 2 and weight.shape[0] != 1 and getattr(state, "quant_type", None) in ("nf4", "fp4")
            and getattr(state, "blocksize", None) in (32, 64, 128, 256, 512, 1024, 2048, 4096)
            and getattr(state, "dtype", None) in (torch.bfloat16, torch.float16, torch.float32)
            and getattr(state, "absmax", None) is not None)


def _absmax(state) -> torch.Tensor:
    """The state's float32 block scales: as stored, or (double quantisation) dequantised as bitsandbytes does,
    once while the stored scales stay the same tensor at the same version."""
    source = state.absmax
    if not getattr(state, "nested", False):
        return source
    # an inference tensor has no version to watch and could not meet autograd later: not kept
    kept = not (torch.is_inference_mode_enabled() or source.is_inference())
    hit = _ABSMAX.get(id(state)) if kept else None  # keyed by identity: QuantState defines == and is not hashable
    if hit is not None and hit[0]() is state and hit[1] is source and hit[2] == source._version:
        return hit[3]
    from bitsandbytes.functional import dequantize_blockwise

    absmax = dequantize_blockwise(source, state.state2)
    absmax += state.offset
    if absmax.dtype != torch.float32:
        absmax = absmax.float()
    if kept:
        key = id(state)
        _ABSMAX[key] = (weakref.ref(state, lambda _, key=key: _ABSMAX.pop(key, None)), source, source._version, absmax)
    return absmax


def absmax_cache_bytes(dense_numel: int, state) -> int:
    """What the kept scales of one double-quantised 4-bit weight of ``dense_numel`` values take (0 otherwise)."""
    if not getattr(state, "nested", False) or not getattr(state, "blocksize", None):
        return 0
    return -(-int(dense_numel) // int(state.blocksize)) * 4


# ----------------------------------------------------------------------------- the base matmul of a 4-bit weight


_FUSE_4BIT = [False]  # set by fusing_4bit() for the length of a train()
_CHOICES: dict = {}  # id(quant state) -> (weak reference to it, key of the facts, Choice)


def fusing_4bit(on: bool) -> None:
    """Let 4-bit weights that are not kept dense run the fused kernels (``on``), or stop; forgets past choices."""
    _FUSE_4BIT[0] = bool(on)
    _CHOICES.clear()


def matmul_4bit_choices() -> dict:
    """How the 4-bit weights met their inputs since :func:`fusing_4bit` was last called: description -> count."""
    counts: dict = {}
    for _, _, choice in _CHOICES.values():
        how = choice.describe()
        counts[how] = counts.get(how, 0) + 1
    return counts


def _fused(weight: torch.Tensor, state, dtype: torch.dtype) -> bool:
    """Whether this 4-bit weight's matmul runs the fused kernels now (``matmul_4bit_plan.choose``, once per weight)."""
    from .. import fallback
    from . import linear_4bit

    failed = not fallback.enabled(linear_4bit.KERNEL)
    key = (dtype, _KEEP_DENSE[0], failed)
    hit = _CHOICES.get(id(state))
    if hit is not None and hit[0]() is state and hit[1] == key:
        return hit[2].option == FUSED

    reason = linear_4bit.not_taken_reason(weight, _absmax(state), getattr(state, "quant_type", None),
                                          getattr(state, "blocksize", None), getattr(state, "shape", None), dtype)
    choice = choose(Facts(setting=FUSED, kept_dense=_KEEP_DENSE[0], kernel_reason=reason, kernel_failed=failed,
                          dense_reason="the memory decision keeps no dense copies in this run"))
    state_id = id(state)
    _CHOICES[state_id] = (weakref.ref(state, lambda _, k=state_id: _CHOICES.pop(k, None)), key, choice)
    return choice.option == FUSED


def base_product(x: torch.Tensor, weight: torch.Tensor, state, dtype: torch.dtype,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T (+ bias)``, ``x`` ``[M, in]`` and ``bias`` in ``dtype``: a plain weight (``state`` None, already in
    ``dtype``) or a 4-bit one, dense (kept or dequantised by bitsandbytes) through cuBLAS, or the fused kernels
    where asked for and possible."""
    if state is not None:
        if _FUSE_4BIT[0] and _fused(weight, state, dtype):
            from .linear_4bit import linear_4bit

            return linear_4bit(x, weight, _absmax(state), state.quant_type, state.blocksize, state.shape, bias)
        weight = dense_weight(weight, state, dtype)
    return x.mm(weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def base_input_grad(dy: torch.Tensor, weight: torch.Tensor, state, dtype: torch.dtype,
                    addend: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dy @ W (+ addend)``: the input gradient of :func:`base_product` (``addend`` is summed in place on the dense
    path, inside the kernel on the fused one)."""
    if state is not None:
        if _FUSE_4BIT[0] and _fused(weight, state, dtype):
            from .linear_4bit import linear_4bit_dx

            return linear_4bit_dx(dy, weight, _absmax(state), state.quant_type, state.blocksize, state.shape, addend)
        weight = dense_weight(weight, state, dtype)
    return dy.mm(weight) if addend is None else addend.addmm_(dy, weight)
