"""The Triton kernels of the varlen attention (``varlen_attention.py`` documents the maths and conventions).

Only ``@triton.jit`` functions live here: the forward, and the backward's three launches (``delta``, dK/dV per
key block, dQ per query block). Their launch shapes and tile choices are in ``varlen_attention_launch.py``.
Nothing is defined when Triton is missing; the caller checks before launching.
"""

from __future__ import annotations

from ._triton import tl, triton

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

