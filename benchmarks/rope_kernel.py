"""GPU check and benchmark of the fused RoPE kernel and of its wiring.

    python benchmarks/rope_kernel.py                 # everything, printed as markdown tables
    python benchmarks/rope_kernel.py --json OUT.json # also write the numbers
    python benchmarks/rope_kernel.py --skip-model    # kernel only

1. Correctness: forward and gradients of ``unsloth_patch::rope`` against a float64 reference on
   the same inputs (relative error ``||ours - ref|| / ||ref||``), next to the eager spelling in the
   same dtype, for fp32 / fp16 / bf16, transformers' layout (``view(B, T, H, D).transpose(1, 2)``)
   and a padding-free row's restarting positions.
2. Speed at T=8192 tokens (Llama-1B heads 32/8 x 64, Qwen3-like 16/8 x 128): device time (median
   of ``triton.testing.do_bench``), host time per call (no synchronisation; the GPU queue runs
   ahead), and CUDA kernel launches per forward+backward (``torch.profiler``), ours vs transformers'
   ``apply_rotary_pos_emb``.
3. One forward+backward of the 1.1B Llama-shaped model on a padding-free batch with the
   ``unsloth_varlen`` attention and fused RMSNorm/SwiGLU, with and without the fused RoPE
   (``UNSLOTH_PATCH_KERNELS_OFF=rope`` spelled as Settings), with and without checkpointing:
   milliseconds per step and launches per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from unsloth_patch.kernels.rope import rope, rope_reference  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tables(positions, dim, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim))
    freqs = positions[..., None].double() * inv
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def inputs(tokens, heads, kv_heads, dim, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, tokens, heads, dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(1, tokens, kv_heads, dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    lengths, start = [], 0
    while start < tokens:  # restarting positions of ~50 sequences
        n = min(tokens - start, 40 + (start * 7919) % 300)
        lengths.append(n)
        start += n
    positions = torch.cat([torch.arange(n, device="cuda") for n in lengths]).unsqueeze(0)
    cos, sin = tables(positions, dim, dtype)
    dq = torch.randn(q.shape, device="cuda", dtype=dtype, generator=g)
    dk = torch.randn(k.shape, device="cuda", dtype=dtype, generator=g)
    return q.requires_grad_(), k.requires_grad_(), cos, sin, dq, dk


def eager(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def run_grads(fn, q, k, cos, sin, dq, dk):
    q.grad = k.grad = None
    qo, ko = fn(q, k, cos, sin)
    torch.autograd.backward((qo, ko), (dq, dk))
    return qo.detach(), ko.detach(), q.grad, k.grad


SHAPES = {"llama-1b 32/8 x 64": (32, 8, 64), "qwen3-like 16/8 x 128": (16, 8, 128)}


def correctness(results, tokens):
    print("\n### correctness (relative error vs float64; q out, k out, dq, dk)\n")
    print("| shape | dtype | ours | eager, same dtype | ours <= bound |")
    print("| --- | --- | --- | --- | --- |")
    ok_all, table = True, {}
    for label, (h, hk, d) in SHAPES.items():
        for dtype, bound in ((torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)):
            q, k, cos, sin, dq, dk = inputs(tokens, h, hk, d, dtype)
            q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
            ref = run_grads(rope_reference, q64, k64, cos.double(), sin.double(), dq.double(), dk.double())
            ours = [rel(a, b) for a, b in zip(run_grads(rope, q, k, cos, sin, dq, dk), ref)]
            theirs = [rel(a, b) for a, b in zip(run_grads(eager, q, k, cos, sin, dq, dk), ref)]
            ok = max(ours) <= bound
            ok_all &= ok
            table[f"{label} {dtype}"] = {"ours": ours, "eager": theirs}
            print(f"| {label} | {str(dtype).split('.')[-1]} | {', '.join(f'{v:.1e}' for v in ours)} | "
                  f"{', '.join(f'{v:.1e}' for v in theirs)} | {'yes' if ok else 'NO'} |")
    results["correctness"] = table
    results["correct"] = ok_all


def launches(step):
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def host_ms(step, n=50):
    step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - started) / n * 1e3
    torch.cuda.synchronize()
    return host


def speed(results, tokens):
    from triton.testing import do_bench

    print(f"\n### speed, {tokens} tokens, bf16 (device ms: do_bench median; host ms per call; CUDA launches)\n")
    print("| shape | pass | ours device | eager device | ours host | eager host | ours launches | eager launches |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    out = {}
    for label, (h, hk, d) in SHAPES.items():
        q, k, cos, sin, dq, dk = inputs(tokens, h, hk, d, torch.bfloat16)
        for name, fn in (("ours", rope), ("eager", eager)):
            fwd = lambda fn=fn: fn(q, k, cos, sin)  # noqa: E731
            both = lambda fn=fn: torch.autograd.backward(fn(q, k, cos, sin), (dq, dk))  # noqa: E731
            out[(label, name)] = {
                "fwd_device": do_bench(fwd, rep=200, return_mode="median"),
                "fwd_bwd_device": do_bench(both, rep=200, return_mode="median"),
                "fwd_host": host_ms(fwd), "fwd_bwd_host": host_ms(both),
                "fwd_launches": launches(fwd), "fwd_bwd_launches": launches(both),
            }
        for part in ("fwd", "fwd_bwd"):
            o, e = out[(label, "ours")], out[(label, "eager")]
            print(f"| {label} | {part.replace('_', '+')} | {o[part + '_device']:.3f} | {e[part + '_device']:.3f} | "
                  f"{o[part + '_host']:.3f} | {e[part + '_host']:.3f} | {o[part + '_launches']} | "
                  f"{e[part + '_launches']} |")
    results["speed"] = {f"{k[0]} {k[1]}": v for k, v in out.items()}


def model_section(results, tokens, rep):
    from triton.testing import do_bench

    from layer_kernels import llama_training_step  # noqa: E402
    from unsloth_patch.edits import Edits
    from unsloth_patch.layers import fuse_model_layers, last_fusion
    from unsloth_patch.settings import Settings

    model, lengths, step = llama_training_step(tokens)
    total = sum(lengths)

    rows, fusions = {}, {}
    variants = (("eager layers", None), ("fused, RoPE off", ("rope",)), ("fused + RoPE", ()))
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for name, off in variants:
            edits = Edits()
            if off is not None:
                fuse_model_layers(model, Settings(kernels_off=off), edits)
                fusions[name] = last_fusion()["fused"]
            torch.cuda.synchronize()
            loss = step().item()
            ms = do_bench(step, warmup=5, rep=rep, return_mode="median")
            rows[(checkpointing, name)] = (ms, loss, launches(step), host_ms(step, n=5))
            edits.rollback()
    print(f"\n### 1.1B Llama, one forward+backward, {total} tokens in {len(lengths)} sequences, bf16\n")
    print(f"fused: {fusions}\n")
    print("| checkpointing | layers | ms (median) | vs RoPE off | host ms (no sync) | launches | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for checkpointing in (False, True):
        base = rows[(checkpointing, "fused, RoPE off")][0]
        for name, _ in variants:
            ms, loss, n, host = rows[(checkpointing, name)]
            print(f"| {'non-reentrant' if checkpointing else 'off'} | {name} | {ms:.1f} | {base / ms:.3f}x | "
                  f"{host:.1f} | {n} | {loss:.4f} |")
    results["model"] = {f"{'ckpt' if c else 'no_ckpt'} {n}": v for (c, n), v in rows.items()}
    results["model_tokens"] = total
    results["fusions"] = fusions


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--model-tokens", type=int, nargs="+", default=[8192])
    parser.add_argument("--rep", type=int, default=1000, help="do_bench milliseconds per model configuration")
    args = parser.parse_args()
    from layer_kernels import device_results  # noqa: E402

    results = device_results()
    correctness(results, args.tokens)
    speed(results, args.tokens)
    if not args.skip_model:
        for tokens in args.model_tokens:
            model_section(results.setdefault(f"model_{tokens}", {}), tokens, args.rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
