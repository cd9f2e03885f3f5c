"""Compile kernels ahead of their first use, by launching each once on a few rows.

Triton compiles a kernel at its first launch for each specialisation (dtype, head dim, block
sizes, flags) and keeps it in memory and in its on-disk cache. Launching the variants a run will
use on tiny inputs — while the rest of the trainer is being built — moves that compilation off
the first training step. The launches bypass the run-time fallback (``_guard``): an error here says
nothing about the real calls, which keep their own fallback; it is returned, not raised.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..settings import triton_interpreting as _interpreting


@dataclass(frozen=True)
class AttentionSpec:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    window: Optional[int] = None
    softcap: Optional[float] = None


@dataclass(frozen=True)
class NormSpec:
    size: int
    dtype: torch.dtype
    weight_dtype: torch.dtype
    offset: float = 0.0


@dataclass(frozen=True)
class GatedSpec:
    dtype: torch.dtype
    gelu: bool = False


@dataclass(frozen=True)
class RopeSpec:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype  # q and k (the projections' output: the compute dtype)
    table_dtype: torch.dtype  # cos and sin (transformers casts them to the hidden states' dtype)


def own_generator(device) -> torch.Generator:
    """The made-up inputs' own random stream: a warm-up runs while the user's code runs (LoRA
    initialisation, dropout), and must not move the process's default generators."""
    return torch.Generator(device=device).manual_seed(0)


def normal(gen, *shape, device, dtype):
    return torch.empty(*shape, device=device, dtype=dtype).normal_(generator=gen)


def normal_like(gen, t):
    return torch.empty_like(t).normal_(generator=gen)  # same strides as ``t``: the launch's specialisation


def _attention_inputs(spec: AttentionSpec, device):
    lengths = [5, 67]  # a short and a longer-than-one-block sequence
    total = sum(lengths)
    cu = torch.tensor([0, lengths[0], total], dtype=torch.int32, device=device)
    gen = own_generator(device)
    q = normal(gen, total, spec.heads, spec.head_dim, device=device, dtype=spec.dtype)
    k = normal(gen, total, spec.kv_heads, spec.head_dim, device=device, dtype=spec.dtype)
    v = normal_like(gen, k)
    window = spec.window if spec.window is not None and spec.window < max(lengths) else None
    if spec.window is not None and window is None:
        window = max(1, max(lengths) - 1)  # the windowed variant, whatever the real window
    return q, k, v, cu, max(lengths), window


def _attention_forward(spec: AttentionSpec, device) -> None:
    va = importlib.import_module("unsloth_patch.kernels.varlen_attention_launch")
    q, k, v, cu, longest, window = _attention_inputs(spec, device)
    va.forward(q, k, v, cu, longest, None, True, window, spec.softcap)


def _backward_inputs(spec: AttentionSpec, device):
    """A made-up forward result for the backward's launches (they compile apart from the forward's)."""
    va = importlib.import_module("unsloth_patch.kernels.varlen_attention_launch")
    q, k, v, cu, longest, window = _attention_inputs(spec, device)
    gen = own_generator(device)
    out = normal_like(gen, q)
    lse = normal(gen, spec.heads, q.shape[0], device=device, dtype=torch.float32).abs() + 1.0
    plan = va.backward_plan(q, k, None, True, window, spec.softcap)
    return va, plan, normal_like(gen, out), q, k, v, out, lse, cu, longest, window


def _attention_backward_delta(spec: AttentionSpec, device) -> None:
    va, plan, do, q, k, v, out, lse, cu, longest, window = _backward_inputs(spec, device)
    va.backward_delta(plan, out, do, lse)


def _attention_backward_kv(spec: AttentionSpec, device) -> None:
    va, plan, do, q, k, v, out, lse, cu, longest, window = _backward_inputs(spec, device)
    va.backward_kv(plan, do, q, k, v, lse, normal_like(own_generator(device), lse), cu, longest, window)


def _attention_backward_q(spec: AttentionSpec, device) -> None:
    va, plan, do, q, k, v, out, lse, cu, longest, window = _backward_inputs(spec, device)
    va.backward_q(plan, do, q, k, v, lse, normal_like(own_generator(device), lse), cu, longest, window)


def _norm_inputs(spec: NormSpec, device):
    gen = own_generator(device)
    x = normal(gen, 8, spec.size, device=device, dtype=spec.dtype)
    weight = normal(gen, spec.size, device=device, dtype=spec.weight_dtype)
    return x, weight


def _norm_forward(spec: NormSpec, device) -> None:
    rms = importlib.import_module("unsloth_patch.kernels.rmsnorm")
    x, weight = _norm_inputs(spec, device)
    rms._forward_triton(x, weight, 1e-6, spec.offset)


def _norm_backward(spec: NormSpec, device) -> None:
    rms = importlib.import_module("unsloth_patch.kernels.rmsnorm")
    x, weight = _norm_inputs(spec, device)
    gen = own_generator(device)
    rstd = torch.empty(x.shape[0], device=device, dtype=torch.float32).uniform_(generator=gen) + 0.5
    rms._backward_triton(normal_like(gen, x), x, weight, rstd, spec.offset)


def _gated_inputs(spec: GatedSpec, device):
    gen = own_generator(device)
    gate = normal(gen, 4, 256, device=device, dtype=spec.dtype)
    return gen, gate, normal_like(gen, gate)


def _gated_forward(spec: GatedSpec, device) -> None:
    sw = importlib.import_module("unsloth_patch.kernels.swiglu")
    _, gate, up = _gated_inputs(spec, device)
    sw._forward_triton(gate, up, spec.gelu)


def _gated_backward(spec: GatedSpec, device) -> None:
    sw = importlib.import_module("unsloth_patch.kernels.swiglu")
    gen, gate, up = _gated_inputs(spec, device)
    sw._backward_triton(normal_like(gen, gate), gate, up, spec.gelu)


def _rope_inputs(spec: RopeSpec, device):
    tokens = 7
    # laid out as transformers lays them out: view(B, T, H, D).transpose(1, 2) of the projections
    gen = own_generator(device)
    q = normal(gen, 1, tokens, spec.heads, spec.head_dim, device=device, dtype=spec.dtype).transpose(1, 2)
    k = normal(gen, 1, tokens, spec.kv_heads, spec.head_dim, device=device, dtype=spec.dtype).transpose(1, 2)
    cos = normal(gen, 1, tokens, spec.head_dim, device=device, dtype=spec.table_dtype)
    return gen, q, k, cos, normal_like(gen, cos)


def _rope_forward(spec: RopeSpec, device) -> None:
    rp = importlib.import_module("unsloth_patch.kernels.rope")
    _, q, k, cos, sin = _rope_inputs(spec, device)
    rp._forward_triton(q, k, cos, sin)


def _rope_backward(spec: RopeSpec, device) -> None:
    rp = importlib.import_module("unsloth_patch.kernels.rope")
    gen, q, k, cos, sin = _rope_inputs(spec, device)
    # gradients laid out as the forward's outputs (``empty_like`` of q and k)
    rp._backward_triton(normal_like(gen, q), normal_like(gen, k), cos, sin)


# the launches of each kind of spec, each compiling kernels of its own (so they may run at once: a forward
# and its backward are separate launches, else the backward's compile waits for the forward's)
_LAUNCHES = {AttentionSpec: (_attention_forward, _attention_backward_delta, _attention_backward_kv,
                             _attention_backward_q), NormSpec: (_norm_forward, _norm_backward),
             GatedSpec: (_gated_forward, _gated_backward), RopeSpec: (_rope_forward, _rope_backward)}


def warm_up(specs, device, parallel: bool = True) -> list:
    """Launch each spec's kernels once on ``device``; returns ``[(spec, error)]`` for those that failed.

    On a GPU the launches run on a thread each: Triton's compiler spends much of its time outside
    the GIL (LLVM, ptxas), so compiles overlap (on an H200, the reference workload's variants with a
    thread per variant: 6.9 s serial, 4.5 s on threads; ``benchmarks/warmup_parallel.py``). The
    interpreter (``TRITON_INTERPRET=1``) patches ``triton.language`` while it runs, so there they
    run one after another.
    """
    tasks = [(spec, launch) for spec in specs for launch in _LAUNCHES[type(spec)]]
    failed = []

    def run(task):
        spec, launch = task
        try:
            if torch.device(device).type == "cuda":
                with torch.cuda.device(device):  # the current device is per thread
                    launch(spec, device)
            else:
                launch(spec, device)
        except Exception as exc:  # the real call has its own fallback; this only moves compilation earlier
            return spec, f"{type(exc).__name__}: {exc}"
        return None

    if parallel and len(tasks) > 1 and not _interpreting():
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(tasks), os.cpu_count() or 1),
                                thread_name_prefix="unsloth_patch-compile") as pool:
            outcomes = list(pool.map(run, tasks))
    else:
        outcomes = [run(task) for task in tasks]
    for outcome in outcomes:
        if outcome is not None and all(outcome[0] is not spec for spec, _ in failed):
            failed.append(outcome)
    return failed
