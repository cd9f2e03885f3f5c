"""Variable-length (padding-free) causal attention in Triton, forward and backward.

A padding-free batch concatenates every sequence of the batch into one row of
``T`` tokens; ``cu_seqlens`` (int32, ``[N + 1]``) marks where each sequence
starts. Attention never crosses a sequence boundary.

Layout and conventions
----------------------
* ``q``: ``[T, Hq, D]``, ``k``/``v``: ``[T, Hk, D]`` with ``Hq % Hk == 0``.
  Query head ``h`` reads KV head ``h // (Hq // Hk)`` (the grouping of
  transformers' ``repeat_kv``); K/V are never repeated in memory.
* Causal mask: query ``i`` sees key ``j`` iff ``j <= i`` (positions local to the
  sequence).
* Sliding window ``w``: additionally ``j > i - w``, so a query sees at most
  ``w`` keys, itself included. This is exactly
  ``transformers.masking_utils.sliding_window_causal_mask_function(w)``
  (``kv_idx > q_idx - w`` and ``kv_idx <= q_idx``), the mask transformers
  builds from ``config.sliding_window`` for Mistral, Qwen2 and Gemma2's local
  layers in its sdpa/eager paths.
* Soft-capping ``c``: scores become ``c * tanh(scale * q.k / c)``, scaling
  first, as in Gemma2's ``eager_attention_forward``.

Backward and determinism
------------------------
The backward pass runs three kernels: ``delta = rowsum(dO * O)``, then one
kernel per key block that accumulates dK and dV over every query block (and,
for GQA, over every query head of the group) in registers, then one kernel per
query block that accumulates dQ over the key blocks. Every output element is
written by exactly one program and the reduction order is fixed, so gradients
are bitwise deterministic run to run. (FlashAttention-2 accumulates dQ with
atomic adds on some paths, which is not deterministic.) The price is that
``Q K^T`` and ``dO V^T`` are computed twice in the backward (7 matrix products
per tile instead of 5).

The log-sum-exp saved for the backward pass is kept in base 2
(``log2(sum(exp2(...)))`` of the base-2 scaled scores), shape ``[Hq, T]``.

Files: the ``@triton.jit`` kernels are in ``varlen_attention_kernels.py``, their tiles and launches in
``varlen_attention_launch.py``, the PyTorch reference in ``varlen_attention_reference.py``; this one holds
the checks, the ops and their autograd.

The kernels run inside ``torch.library`` custom ops (``unsloth_patch::varlen_attention`` and
its backward) with fake implementations, so ``torch.compile`` treats each as one opaque
operation. A launch that fails (a compile error, say) makes the op compute the same maths in
plain PyTorch for the rest of the run, once warned.

Triton is imported here but failures are deferred: ``import
unsloth_patch.kernels`` works without Triton, and calling the kernel then
raises a clear ``RuntimeError``.
"""

from __future__ import annotations

import functools
from typing import Optional

try:  # torch and triton are optional at import time; checked when called.
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency in practice
    torch = None

from . import _guard
from ._triton import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR
from ._triton import triton
from ..settings import triton_interpreting as _interpreting

__all__ = ["varlen_attention", "is_supported", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)


def _supported_dtypes():
    return (torch.float16, torch.bfloat16, torch.float32)


def is_supported(device, dtype, head_dim) -> bool:
    """True when :func:`varlen_attention` can run for this device/dtype/head dim.

    CUDA needs compute capability >= 8.0 (Ampere: bf16 and the block sizes we
    use). Under ``TRITON_INTERPRET=1`` CPU tensors are supported too, which is
    how the tests run without a GPU.
    """
    if torch is None or triton is None:
        return False
    device = torch.device(device)
    return _is_supported_cached(device.type, device.index, dtype, int(head_dim), _interpreting())


@functools.lru_cache(maxsize=None)
def _is_supported_cached(device_type, device_index, dtype, head_dim, interpreting) -> bool:
    # Cached: the capability query is a measurable part of a small call's CPU time.
    if head_dim not in SUPPORTED_HEAD_DIMS or dtype not in _supported_dtypes():
        return False
    if device_type == "cpu":
        return interpreting
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(torch.device(device_type, device_index))
    return major >= 8


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, window, softcap):
    if torch is None or triton is None:
        raise RuntimeError(
            "varlen_attention needs torch and triton; triton failed to import: "
            f"{_TRITON_IMPORT_ERROR!r}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], got {getattr(t, 'shape', t)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same number of tokens, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[2]} and {k.shape[2]}")
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"number of query heads ({num_q_heads}) must be a multiple of the number of key/value heads ({num_kv_heads})"
        )
    head_dim = q.shape[2]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in _supported_dtypes() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype among float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be an int32 tensor, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens))}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError("q, k, v and cu_seqlens must be on the same device")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be 1-D with at least two entries [0, ..., total_tokens]")
    if isinstance(max_seqlen, torch.Tensor) or int(max_seqlen) != max_seqlen or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive python int, got {max_seqlen!r}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be None or a positive int, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or a positive float, got {softcap!r}")
    if not is_supported(q.device, q.dtype, head_dim):
        raise RuntimeError(
            f"varlen_attention does not run on {q.device} with {q.dtype}: it needs a CUDA GPU with compute "
            "capability >= 8.0 (or TRITON_INTERPRET=1 for CPU tensors)"
        )


KERNEL = "varlen attention kernel"


if torch is not None:
    from . import _eager
    from .varlen_attention_launch import backward as _backward
    from .varlen_attention_launch import forward as _forward
    from .varlen_attention_launch import last_dim_contiguous as _last_dim_contiguous
    from .varlen_attention_reference import backward_reference as _backward_reference
    from .varlen_attention_reference import forward_reference as _forward_reference

    def _attention_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        max_seqlen: int, sm_scale: Optional[float], causal: bool, window: Optional[int],
                        softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
        return _guard.run(KERNEL, _forward, _forward_reference,
                          q, k, v, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap)

    _attention_op = torch.library.custom_op("unsloth_patch::varlen_attention", _attention_body, mutates_args=())

    @_attention_op.register_fake
    def _(q, k, v, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap):
        return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    def _attention_backward_body(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                 sm_scale: Optional[float], causal: bool, window: Optional[int],
                                 softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _guard.run(KERNEL, _backward, _backward_reference,
                          do, q, k, v, out, lse, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap)

    _attention_backward_op = torch.library.custom_op("unsloth_patch::varlen_attention_backward",
                                                     _attention_backward_body, mutates_args=())

    @_attention_backward_op.register_fake
    def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
        ctx.args = (max_seqlen, sm_scale, causal, window, softcap)

    def _attention_grad(ctx, do, _dlse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _eager.call(_attention_backward_op, _attention_backward_body,
                                 _last_dim_contiguous(do), q, k, v, out, lse, cu_seqlens, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None

    _attention_op.register_autograd(_attention_grad, setup_context=_setup_context)
    _attention_apply = _eager.differentiable(_attention_body, _setup_context, _attention_grad, "VarlenAttention")


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None, causal=True,
                     window=None, softcap=None):
    """Attention over a padding-free batch; differentiable w.r.t. q, k, v.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hk, D]``, ``Hq % Hk == 0`` (GQA/MQA
            without repeating K/V). fp16/bf16 on GPU; fp32 is supported (exact
            fp32 products) for tests and the CPU interpreter.
        cu_seqlens: int32 ``[N + 1]`` on q's device, ``0 = c_0 <= ... <= c_N = T``.
        max_seqlen: python int >= the longest sequence; sizes the launch grid
            (no device sync). Rows past ``max_seqlen`` would be left unwritten.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        causal: causal mask within each sequence (``False``: full attention
            within each sequence).
        window: sliding window ``w``: query ``i`` sees keys ``i - w < j <= i``,
            the convention of transformers' ``sliding_window_causal_mask_function``.
            Needs ``causal=True``.
        softcap: ``c``: scores ``c * tanh(scale * q.k / c)`` (Gemma2).

    Returns:
        ``[T, Hq, D]`` in q's dtype.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, window, softcap)
    if window is not None and not causal:
        raise ValueError("window needs causal=True (a causal sliding window)")
    max_seqlen = int(max_seqlen)
    if window is not None and int(window) >= max_seqlen:
        window = None  # the window covers every sequence: plain causal is the same mask, and cheaper
    window = None if window is None else int(window)
    softcap = None if softcap is None else float(softcap)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out, _ = _attention_apply(_attention_op, q, k, v, cu_seqlens, max_seqlen,
                           None if softmax_scale is None else float(softmax_scale), bool(causal), window, softcap)
    return out
