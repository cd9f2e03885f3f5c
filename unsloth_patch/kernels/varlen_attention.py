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
import math
from dataclasses import dataclass
from typing import Optional

try:  # torch and triton are optional at import time; checked when called.
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency in practice
    torch = None

from . import _guard
from ._triton import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR
from ._triton import tl, triton
from ..settings import triton_interpreting as _interpreting

__all__ = ["varlen_attention", "is_supported", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
_LOG2E = 1.4426950408889634


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


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------

if triton is not None:

    # Token counts and windows change every batch: compile one variant, not one per divisibility class.
    _RUNTIME_SIZES = ["total_tokens", "window"]

    @triton.jit
    def _tanh(x):
        # tanh through exp2 so it runs on every Triton version (and the
        # interpreter); saturates cleanly to +-1 for large |x|.
        e = tl.exp2(x * 2.8853900817779268)  # exp(2x)
        return 1.0 - 2.0 / (e + 1.0)

    @triton.jit
    def _scores(qk, qk_scale_log2, softcap_in, softcap_out_log2, HAS_SOFTCAP: tl.constexpr):
        """Raw dot products -> base-2 logits (and tanh for the backward)."""
        if HAS_SOFTCAP:
            t = _tanh(qk * softcap_in)
            return t * softcap_out_log2, t
        else:
            return qk * qk_scale_log2, qk

    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q,
        k_base, v_base, stride_kt, stride_vt,
        offs_m, offs_d, seq_len, window,
        lo, hi,
        qk_scale_log2, softcap_in, softcap_out_log2,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_mask = offs_d[None, :] < HEAD_DIM
            if MASKED:
                kv_mask = kv_mask & (offs_n[:, None] < seq_len)
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            s, _unused = _scores(qk, qk_scale_log2, softcap_in, softcap_out_log2, HAS_SOFTCAP)
            if MASKED:
                valid = offs_n[None, :] < seq_len
                if CAUSAL:
                    valid = valid & (offs_n[None, :] <= offs_m[:, None])
                if HAS_WINDOW:
                    valid = valid & (offs_n[None, :] > offs_m[:, None] - window)
                s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _query_block_ranges(m0, seq_len, window,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
        """Key ranges for query rows [m0, m0 + BLOCK_M): masked [lo, full_lo),
        unmasked [full_lo, full_hi), masked [full_hi, hi). Bounds are multiples
        of BLOCK_N except hi."""
        if CAUSAL:
            hi = tl.minimum(seq_len, m0 + BLOCK_M)
            full_hi = ((m0 + 1) // BLOCK_N) * BLOCK_N  # blocks wholly at or below row m0
        else:
            hi = seq_len
            full_hi = (seq_len // BLOCK_N) * BLOCK_N
        if HAS_WINDOW:
            lo = (tl.maximum(m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
            # first key block wholly inside the window of the last row
            full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
            full_lo = tl.minimum(full_lo, full_hi)
        else:
            lo = 0
            full_lo = 0
        return lo, full_lo, full_hi, hi

    @triton.jit(do_not_specialize=_RUNTIME_SIZES)
    def _fwd_kernel(
        Q, K, V, O, LSE, CU_SEQLENS,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        total_tokens, window,
        qk_scale_log2, softcap_in, softcap_out_log2,
        GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        head = tl.program_id(0)
        seq = tl.program_id(1)
        # Longest query blocks (most causal work) are launched first.
        m_block = tl.num_programs(2) - 1 - tl.program_id(2)
        seq_start = tl.load(CU_SEQLENS + seq)
        seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
        m0 = m_block * BLOCK_M
        if m0 >= seq_len:
            return
        seq_start = seq_start.to(tl.int64)
        kv_head = head // GROUP

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < seq_len
        q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + (seq_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        k_base = K + seq_start * stride_kt + kv_head * stride_kh
        v_base = V + seq_start * stride_vt + kv_head * stride_vh

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        lo, full_lo, full_hi, hi = _query_block_ranges(m0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
        if HAS_WINDOW:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                       offs_m, offs_d, seq_len, window, lo, full_lo,
                                       qk_scale_log2, softcap_in, softcap_out_log2,
                                       HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW,
                                       HAS_SOFTCAP, DOT_PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   offs_m, offs_d, seq_len, window, full_lo, full_hi,
                                   qk_scale_log2, softcap_in, softcap_out_log2,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_WINDOW,
                                   HAS_SOFTCAP, DOT_PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   offs_m, offs_d, seq_len, window, tl.maximum(full_hi, full_lo), hi,
                                   qk_scale_log2, softcap_in, softcap_out_log2,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_WINDOW,
                                   HAS_SOFTCAP, DOT_PRECISION)

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + (seq_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=q_mask)
        tl.store(LSE + head * total_tokens + seq_start + offs_m, m_i + tl.log2(l_safe), mask=row_ok)

    @triton.jit(do_not_specialize=["total_tokens"])
    def _bwd_delta_kernel(
        O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total_tokens,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (fp32)."""
        head = tl.program_id(1)
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_t[:, None] < total_tokens) & (offs_d[None, :] < HEAD_DIM)
        rows = offs_t.to(tl.int64)[:, None]
        o = tl.load(O + rows * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + rows * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + head * total_tokens + offs_t, delta, mask=offs_t < total_tokens)

    @triton.jit
    def _bwd_kv_inner(
        dk, dv, k, v,
        q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
        offs_n, offs_d, seq_len, window, lo, hi,
        qk_scale_log2, softcap_in, softcap_out_log2,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # Rows past the sequence end load q = dO = 0 and lse = delta = 0, so
        # they contribute exactly zero without a score mask.
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seq_len
            qd_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=qd_mask, other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
            sT, tT = _scores(qkT, qk_scale_log2, softcap_in, softcap_out_log2, HAS_SOFTCAP)
            pT = tl.exp2(sT - lse[None, :])
            if MASKED:
                valid = offs_m[None, :] >= 0
                if CAUSAL:
                    valid = valid & (offs_n[:, None] <= offs_m[None, :])
                if HAS_WINDOW:
                    valid = valid & (offs_n[:, None] > offs_m[None, :] - window)
                pT = tl.where(valid, pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dsT = pT * (dpT - delta[None, :])
            if HAS_SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
        return dk, dv

    @triton.jit(do_not_specialize=_RUNTIME_SIZES)
    def _bwd_kv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        total_tokens, window,
        sm_scale, qk_scale_log2, softcap_in, softcap_out_log2,
        GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
        n_block = tl.program_id(2)  # earliest key blocks (most causal work) first
        seq_start = tl.load(CU_SEQLENS + seq)
        seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
        n0 = n_block * BLOCK_N
        if n0 >= seq_len:
            return
        seq_start = seq_start.to(tl.int64)

        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (offs_n[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + (seq_start + offs_n)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + (seq_start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        # Query-row ranges for this key block: masked [lo, full_lo),
        # unmasked [full_lo, full_hi), masked [full_hi, hi).
        if CAUSAL:
            lo = (n0 // BLOCK_M) * BLOCK_M
            full_lo = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M  # first row >= last key
        else:
            lo = 0
            full_lo = 0
        if HAS_WINDOW:
            hi = tl.minimum(seq_len, n0 + BLOCK_N - 1 + window)
            full_hi = ((n0 + window) // BLOCK_M) * BLOCK_M  # rows < first key + window
        else:
            hi = seq_len
            full_hi = seq_len
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

        for g in range(GROUP):
            head = kv_head * GROUP + g
            q_base = Q + seq_start * stride_qt + head * stride_qh
            do_base = DO + seq_start * stride_dot + head * stride_doh
            lse_base = LSE + head * total_tokens + seq_start
            delta_base = DELTA + head * total_tokens + seq_start
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                   offs_n, offs_d, seq_len, window, lo, full_lo,
                                   qk_scale_log2, softcap_in, softcap_out_log2,
                                   HEAD_DIM, BLOCK_M, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                   offs_n, offs_d, seq_len, window, full_lo, full_hi,
                                   qk_scale_log2, softcap_in, softcap_out_log2,
                                   HEAD_DIM, BLOCK_M, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
            if HAS_WINDOW:
                dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                       offs_n, offs_d, seq_len, window, full_hi, hi,
                                       qk_scale_log2, softcap_in, softcap_out_log2,
                                       HEAD_DIM, BLOCK_M, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)

        dk = dk * sm_scale
        tl.store(DK + (seq_start + offs_n)[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + (seq_start + offs_n)[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_q_inner(
        dq, q, do, lse, delta,
        k_base, v_base, stride_kt, stride_vt,
        offs_m, offs_d, seq_len, window, lo, hi,
        qk_scale_log2, softcap_in, softcap_out_log2,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_mask = offs_d[None, :] < HEAD_DIM
            if MASKED:
                kv_mask = kv_mask & (offs_n[:, None] < seq_len)
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            s, t = _scores(qk, qk_scale_log2, softcap_in, softcap_out_log2, HAS_SOFTCAP)
            p = tl.exp2(s - lse[:, None])
            if MASKED:
                valid = offs_n[None, :] < seq_len
                if CAUSAL:
                    valid = valid & (offs_n[None, :] <= offs_m[:, None])
                if HAS_WINDOW:
                    valid = valid & (offs_n[None, :] > offs_m[:, None] - window)
                p = tl.where(valid, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        return dq

    @triton.jit(do_not_specialize=_RUNTIME_SIZES)
    def _bwd_q_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dqt, stride_dqh,
        total_tokens, window,
        sm_scale, qk_scale_log2, softcap_in, softcap_out_log2,
        GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        head = tl.program_id(0)
        seq = tl.program_id(1)
        m_block = tl.num_programs(2) - 1 - tl.program_id(2)
        seq_start = tl.load(CU_SEQLENS + seq)
        seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
        m0 = m_block * BLOCK_M
        if m0 >= seq_len:
            return
        seq_start = seq_start.to(tl.int64)
        kv_head = head // GROUP

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < seq_len
        q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + (seq_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        do = tl.load(DO + (seq_start + offs_m)[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                     mask=q_mask, other=0.0)
        lse = tl.load(LSE + head * total_tokens + seq_start + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + head * total_tokens + seq_start + offs_m, mask=row_ok, other=0.0)
        k_base = K + seq_start * stride_kt + kv_head * stride_kh
        v_base = V + seq_start * stride_vt + kv_head * stride_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        lo, full_lo, full_hi, hi = _query_block_ranges(m0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
        if HAS_WINDOW:
            dq = _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                              offs_m, offs_d, seq_len, window, lo, full_lo,
                              qk_scale_log2, softcap_in, softcap_out_log2,
                              HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
        dq = _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                          offs_m, offs_d, seq_len, window, full_lo, full_hi,
                          qk_scale_log2, softcap_in, softcap_out_log2,
                          HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
        dq = _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                          offs_m, offs_d, seq_len, window, tl.maximum(full_hi, full_lo), hi,
                          qk_scale_log2, softcap_in, softcap_out_log2,
                          HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
        dq = dq * sm_scale
        tl.store(DQ + (seq_start + offs_m)[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, hand-picked per head
# dim on an H100 (see docs/kernel-notes.md). Keys: fwd, bwd_kv, bwd_q.
_GPU_CONFIGS = {
    64: {"fwd": (64, 64, 4, 3), "bwd_kv": (32, 64, 4, 3), "bwd_q": (64, 32, 4, 4)},
    128: {"fwd": (64, 64, 4, 3), "bwd_kv": (32, 64, 4, 2), "bwd_q": (64, 32, 4, 4)},
    256: {"fwd": (64, 32, 4, 2), "bwd_kv": (32, 32, 4, 1), "bwd_q": (32, 32, 4, 1)},
}
# Small tiles keep the CPU interpreter fast; 16 is tl.dot's minimum.
_INTERPRETER_CONFIG = {"fwd": (16, 16, 1, 1), "bwd_kv": (16, 16, 1, 1), "bwd_q": (16, 16, 1, 1)}


def _select_config(head_dim: int, block_d: int, dtype, device) -> dict:
    """Block sizes for one call; tests monkeypatch this to cover other tilings."""
    if device.type == "cpu":
        return _INTERPRETER_CONFIG
    if block_d <= 64:
        cfg = _GPU_CONFIGS[64]
    elif block_d <= 128:
        cfg = _GPU_CONFIGS[128]
    else:
        cfg = _GPU_CONFIGS[256]
    if dtype == torch.float32:  # fp32 tiles are twice the bytes: halve the key block
        cfg = {name: (bm, max(16, bn // 2), w, max(1, s - 1)) for name, (bm, bn, w, s) in cfg.items()}
    return cfg


# ----------------------------------------------------------------------------
# Python entry points
# ----------------------------------------------------------------------------


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


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _scalars(head_dim, softmax_scale, softcap):
    sm_scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if softcap is None:
        return sm_scale, sm_scale * _LOG2E, 0.0, 0.0
    return sm_scale, sm_scale * _LOG2E, sm_scale / float(softcap), float(softcap) * _LOG2E


def _forward(q, k, v, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap):
    total, num_q_heads, head_dim = q.shape
    num_seqs = cu_seqlens.numel() - 1
    block_d = triton.next_power_of_2(head_dim)
    sm_scale, qk_scale_log2, softcap_in, softcap_out_log2 = _scalars(head_dim, sm_scale, softcap)
    cfg = _select_config(head_dim, block_d, q.dtype, q.device)
    block_m, block_n, num_warps, num_stages = cfg["fwd"]
    out = torch.empty_like(q)
    lse = torch.empty((num_q_heads, total), device=q.device, dtype=torch.float32)
    grid = (num_q_heads, num_seqs, triton.cdiv(max_seqlen, block_m))
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        total, window or 0,
        qk_scale_log2, softcap_in, softcap_out_log2,
        GROUP=num_q_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def _backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap):
    plan = _backward_plan(q, k, sm_scale, causal, window, softcap)
    do = _last_dim_contiguous(do)
    delta = _backward_delta(plan, out, do, lse)
    dk, dv = _backward_kv(plan, do, q, k, v, lse, delta, cu_seqlens, max_seqlen, window)
    dq = _backward_q(plan, do, q, k, v, lse, delta, cu_seqlens, max_seqlen, window)
    return dq, dk, dv


@dataclass(frozen=True)
class _BackwardPlan:
    """What the backward's three launches share; each launch compiles apart (the warm-up runs them at once)."""

    scalars: tuple  # sm_scale, qk_scale_log2, softcap_in, softcap_out_log2
    cfg: dict
    common: dict
    block_d: int


def _backward_plan(q, k, sm_scale, causal, window, softcap) -> _BackwardPlan:
    head_dim, num_q_heads, num_kv_heads = q.shape[2], q.shape[1], k.shape[1]
    block_d = triton.next_power_of_2(head_dim)
    common = dict(
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
        CAUSAL=causal, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
    )
    return _BackwardPlan(_scalars(head_dim, sm_scale, softcap), _select_config(head_dim, block_d, q.dtype, q.device),
                         common, block_d)


def _backward_delta(plan: _BackwardPlan, out, do, lse):
    """rowsum(dO * O) per query row and head."""
    total, num_q_heads, head_dim = out.shape
    delta = torch.empty_like(lse)
    block_t = 64 if plan.block_d <= 128 else 32
    _bwd_delta_kernel[(triton.cdiv(total, block_t), num_q_heads)](
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), total,
        HEAD_DIM=head_dim, BLOCK_D=plan.block_d, BLOCK_T=block_t,
    )
    return delta


def _backward_kv(plan: _BackwardPlan, do, q, k, v, lse, delta, cu_seqlens, max_seqlen, window):
    total, num_kv_heads, num_seqs = q.shape[0], k.shape[1], cu_seqlens.numel() - 1
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    block_m, block_n, num_warps, num_stages = plan.cfg["bwd_kv"]
    _bwd_kv_kernel[(num_kv_heads, num_seqs, triton.cdiv(max_seqlen, block_n))](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        total, window or 0, *plan.scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **plan.common,
    )
    return dk, dv


def _backward_q(plan: _BackwardPlan, do, q, k, v, lse, delta, cu_seqlens, max_seqlen, window):
    total, num_q_heads, num_seqs = q.shape[0], q.shape[1], cu_seqlens.numel() - 1
    dq = torch.empty_like(q)
    block_m, block_n, num_warps, num_stages = plan.cfg["bwd_q"]
    _bwd_q_kernel[(num_q_heads, num_seqs, triton.cdiv(max_seqlen, block_m))](
        q, k, v, do, lse, delta, dq, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        total, window or 0, *plan.scalars,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **plan.common,
    )
    return dq


KERNEL = "varlen attention kernel"


def _reference_scores(q, k, scale, causal, window, softcap):
    """Scores (fp32, capped, masked) of one sequence: q [H, n, D], k [H, n, D] -> [H, n, n]."""
    raw = torch.matmul(q, k.transpose(-1, -2)) * scale
    capped = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    n = q.shape[1]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    allowed = (j <= i) if causal else torch.ones(n, n, dtype=torch.bool, device=q.device)
    if window is not None:
        allowed = allowed & (i - j < window)
    return raw, capped.masked_fill(~allowed, float("-inf"))


def _sequences(cu_seqlens):
    bounds = cu_seqlens.tolist()
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _forward_reference(q, k, v, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap):
    """The kernel's maths in plain PyTorch (fp32), one sequence at a time: ``(out, base-2 lse)``."""
    total, heads, head_dim = q.shape
    group = heads // k.shape[1]
    scale, _, _, _ = _scalars(head_dim, sm_scale, softcap)
    out = torch.zeros_like(q)
    lse = torch.zeros((heads, total), device=q.device, dtype=torch.float32)
    for a, b in _sequences(cu_seqlens):
        qs = q[a:b].transpose(0, 1).float()
        ks = k[a:b].transpose(0, 1).float().repeat_interleave(group, dim=0)
        vs = v[a:b].transpose(0, 1).float().repeat_interleave(group, dim=0)
        _, scores = _reference_scores(qs, ks, scale, causal, window, softcap)
        lse[:, a:b] = torch.logsumexp(scores, dim=-1) * _LOG2E
        out[a:b] = torch.matmul(torch.softmax(scores, dim=-1), vs).transpose(0, 1).to(q.dtype)
    return out, lse


def _backward_reference(do, q, k, v, out, lse, cu_seqlens, max_seqlen, sm_scale, causal, window, softcap):
    """Gradients of the kernel's maths in plain PyTorch (fp32), recomputed from q, k, v."""
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    group = heads // kv_heads
    scale, _, _, _ = _scalars(head_dim, sm_scale, softcap)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, b in _sequences(cu_seqlens):
        n = b - a
        qs = q[a:b].transpose(0, 1).float()
        ks = k[a:b].transpose(0, 1).float().repeat_interleave(group, dim=0)
        vs = v[a:b].transpose(0, 1).float().repeat_interleave(group, dim=0)
        dos = do[a:b].transpose(0, 1).float()
        raw, scores = _reference_scores(qs, ks, scale, causal, window, softcap)
        p = torch.softmax(scores, dim=-1)
        o = torch.matmul(p, vs)
        dvs = torch.matmul(p.transpose(-1, -2), dos)
        dp = torch.matmul(dos, vs.transpose(-1, -2))
        ds = p * (dp - (dos * o).sum(-1, keepdim=True))
        if softcap is not None:
            ds = ds * (1.0 - torch.tanh(raw / softcap) ** 2)
        dqs = torch.matmul(ds, ks) * scale
        dks = torch.matmul(ds.transpose(-1, -2), qs) * scale
        dq[a:b] = dqs.transpose(0, 1).to(q.dtype)
        dk[a:b] = dks.reshape(kv_heads, group, n, head_dim).sum(1).transpose(0, 1).to(k.dtype)
        dv[a:b] = dvs.reshape(kv_heads, group, n, head_dim).sum(1).transpose(0, 1).to(v.dtype)
    return dq, dk, dv


if torch is not None:
    from . import _eager

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
