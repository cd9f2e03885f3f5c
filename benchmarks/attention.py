"""Benchmark and GPU check of ``unsloth_patch.kernels.varlen_attention``.

    python benchmarks/attention.py --check          # bf16/fp16 vs an fp32 reference
    python benchmarks/attention.py --tune           # sweep block sizes per kernel
    python benchmarks/attention.py                  # speed table vs torch/flex/SDPA
    python benchmarks/attention.py --check --bench --out DIR

Batches are padding-free: real chat conversations (token lengths in
``chitchat_lengths.json``) truncated at 2048, 8 or 16 per batch, and 16k-token
batches filled the same way. Useful causal FLOPs: fwd = 4 * Hq * D * sum_i
L_i (L_i + 1) / 2, bwd = 2.5 x fwd. Times are medians of
``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import importlib  # noqa: E402

va_launch = importlib.import_module("unsloth_patch.kernels.varlen_attention_launch")
from unsloth_patch.kernels.varlen_attention import varlen_attention  # noqa: E402

LENGTHS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chitchat_lengths.json")
HEAD_CONFIGS = [(64, 32, 8), (128, 16, 4), (128, 32, 8)]  # (D, Hq, Hk)


# ---------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------

def real_lengths():
    with open(LENGTHS_FILE) as f:
        return json.load(f)["lengths"]


def conversation_batch(num, seed, cap=2048):
    rng = random.Random(seed)
    return [min(cap, x) for x in rng.sample(real_lengths(), num)]


def token_batch(total, seed, cap=2048):
    rng = random.Random(seed)
    pool = real_lengths()
    lens = []
    while sum(lens) < total:
        lens.append(min(cap, rng.choice(pool)))
    lens[-1] -= sum(lens) - total
    return [x for x in lens if x > 0]


def make_inputs(lens, hq, hk, d, dtype, device="cuda", requires_grad=True):
    t = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    q = torch.randn(t, hq, d, device=device, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(t, hk, d, device=device, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(t, hk, d, device=device, dtype=dtype, requires_grad=requires_grad)
    return q, k, v, cu


def causal_flops(lens, hq, d):
    return 4.0 * hq * d * sum(x * (x + 1) / 2 for x in lens)


# ---------------------------------------------------------------------------
# correctness on the GPU
# ---------------------------------------------------------------------------

def reference(q, k, v, cu, scale=None, window=None, softcap=None):
    """fp32 per-sequence attention with explicit scores and mask."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].repeat_interleave(group, 1).transpose(0, 1)
        vs = v[s:e].repeat_interleave(group, 1).transpose(0, 1)
        sc = qs @ ks.transpose(-1, -2) * scale
        if softcap is not None:
            sc = softcap * torch.tanh(sc / softcap)
        n = e - s
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None, :]
        mask = j <= i
        if window is not None:
            mask &= j > i - window
        sc = sc.masked_fill(~mask, float("-inf"))
        outs.append((sc.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def rel(a, b):
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


def run_check(out_lines, quick=False):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases = []
    for d, hq, hk in [(64, 8, 2), (128, 8, 2), (64, 8, 1), (128, 4, 4)]:
        for window, softcap in [(None, None), (128, None), (None, 30.0), (96, 20.0)]:
            cases.append((d, hq, hk, window, softcap))
    cases += [(80, 8, 2, None, None), (96, 8, 2, 100, 25.0), (256, 4, 2, None, None), (256, 4, 1, 64, 30.0)]
    lens_sets = [conversation_batch(16, seed=1), [1, 2, 17, 63, 64, 65, 129, 300, 1]]
    if quick:  # the block-range logic per head dim, both dtypes, one length set
        cases = [c for c in cases if c[2] == 2 or c[0] == 256]
        lens_sets = lens_sets[:1]
    header = "| dtype | D | Hq/Hk | window | softcap | lengths | out | dq | dk | dv | deterministic |"
    out_lines += [header, "|" + "---|" * 11]
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        for li, lens in enumerate(lens_sets):
            for d, hq, hk, window, softcap in cases:
                if li == 1 and d not in (64, 128):
                    continue
                torch.manual_seed(hash((d, hq, hk, window, softcap, li)) % 2**31)
                q, k, v, cu = make_inputs(lens, hq, hk, d, dtype)
                # Poison the allocator so unwritten output rows would show up as NaN.
                poison = torch.full((q.numel() * 4,), float("nan"), device="cuda", dtype=dtype)
                del poison
                o = varlen_attention(q, k, v, cu, max(lens), window=window, softcap=softcap)
                do = torch.randn_like(o)
                dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
                dq2, dk2, dv2 = torch.autograd.grad(
                    varlen_attention(q, k, v, cu, max(lens), window=window, softcap=softcap), (q, k, v), do)
                det = all(torch.equal(a, b) for a, b in ((dq, dq2), (dk, dk2), (dv, dv2)))
                qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
                r = reference(qf, kf, vf, cu, window=window, softcap=softcap)
                rq, rk, rv = torch.autograd.grad(r, (qf, kf, vf), do.float())
                errs = [rel(o, r), rel(dq, rq), rel(dk, rk), rel(dv, rv)]
                worst = max(worst, *[e if e == e else float("inf") for e in errs])
                name = "bf16" if dtype == torch.bfloat16 else "fp16"
                lens_name = f"16 conv ({sum(lens)} tok)" if li == 0 else "edge (1..300)"
                out_lines.append(
                    f"| {name} | {d} | {hq}/{hk} | {window} | {softcap} | {lens_name} | "
                    + " | ".join(f"{e:.1e}" for e in errs) + f" | {'yes' if det else 'NO'} |")
                print(out_lines[-1], flush=True)
    verdict = "PASS" if worst <= 1e-2 else "FAIL"
    out_lines.append(f"\nworst relative error {worst:.2e} (limit 1e-2): {verdict}")
    print(out_lines[-1], flush=True)
    return worst <= 1e-2


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------

def bench_ms(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn):
    """Median ms of one CUDA-graph replay of ``fn``: device time without launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def time_method(call, inputs):
    """(fwd, bwd, fwd+bwd, fwd+bwd replayed from a CUDA graph) ms, autograd included."""
    out = call(*inputs)
    do = torch.randn_like(out)
    fwd = bench_ms(lambda: call(*inputs))
    out = call(*inputs)
    bwd = bench_ms(lambda: torch.autograd.grad(out, inputs, do, retain_graph=True))
    both = bench_ms(lambda: torch.autograd.grad(call(*inputs), inputs, do))
    del out
    try:
        graphed = graph_ms(lambda: torch.autograd.grad(call(*inputs), inputs, do))
    except Exception as exc:  # not every baseline can be captured
        print(f"    graph capture failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        graphed = float("nan")
    return fwd, bwd, both, graphed


def method_ours(q, k, v, cu, lens):
    m = max(lens)
    return (lambda q_, k_, v_: varlen_attention(q_, k_, v_, cu, m)), (q, k, v), ""


def method_torch_varlen(q, k, v, cu, lens):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    m = max(lens)
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    note = ""
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            g = q.shape[1] // k.shape[1]
            k = k.detach().repeat_interleave(g, 1).requires_grad_()
            v = v.detach().repeat_interleave(g, 1).requires_grad_()
            note = "K/V repeated before timing"
    return (lambda q_, k_, v_: varlen_attn(q_, k_, v_, cu, cu, m, m, **kwargs)), (q, k, v), note


_FLEX_COMPILED = None


def method_flex(q, k, v, cu, lens):
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX_COMPILED is None:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = 64  # never fall back to (slow, quadratic-memory) eager flex
        try:  # the bwd-only timing replays backward with retain_graph=True
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False
        except (ImportError, AttributeError):
            pass
        _FLEX_COMPILED = torch.compile(flex_attention)
    t = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(lens), device=q.device),
                                  torch.tensor(lens, device=q.device))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, None, None, t, t, device=q.device)
    gqa = q.shape[1] != k.shape[1]
    qb, kb, vb = (x.detach().transpose(0, 1).unsqueeze(0).requires_grad_() for x in (q, k, v))
    return (lambda q_, k_, v_: _FLEX_COMPILED(q_, k_, v_, block_mask=block_mask, enable_gqa=gqa)), (qb, kb, vb), \
        "block mask built before timing"


def _sdpa_gqa_kwargs(q, k):
    try:
        has_gqa = "enable_gqa" in inspect.signature(torch.nn.functional.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: enable_gqa exists since torch 2.5
        has_gqa = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
    return {"enable_gqa": True} if (has_gqa and q.shape[1] != k.shape[1]) else {}


def method_sdpa_padded(q, k, v, cu, lens):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, lmax = len(lens), max(lens)
    def pad(x):
        out = x.new_zeros(b, x.shape[1], lmax, x.shape[2])
        s = 0
        for i, n in enumerate(lens):
            out[i, :, :n] = x[s:s + n].transpose(0, 1)
            s += n
        return out.detach().requires_grad_()
    qb, kb, vb = pad(q), pad(k), pad(v)
    kw = _sdpa_gqa_kwargs(q, k)

    def call(q_, k_, v_):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, is_causal=True, **kw)
    return call, (qb, kb, vb), f"[{b},H,{lmax},D], padded before timing"


def method_sdpa_dense(q, k, v, cu, lens):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(lens), device=q.device), torch.tensor(lens, device=q.device))
    pos = torch.arange(t, device=q.device)
    mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    g = q.shape[1] // k.shape[1]
    qb = q.detach().transpose(0, 1).unsqueeze(0).requires_grad_()
    kb = k.detach().repeat_interleave(g, 1).transpose(0, 1).unsqueeze(0).requires_grad_()
    vb = v.detach().repeat_interleave(g, 1).transpose(0, 1).unsqueeze(0).requires_grad_()

    def call(q_, k_, v_):
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)
    return call, (qb, kb, vb), "[1,H,T,D] + T x T bool mask, K/V repeated before timing"


METHODS = [
    ("ours (Triton varlen)", method_ours),
    ("torch varlen_attn (FA2)", method_torch_varlen),
    ("FlexAttention doc mask", method_flex),
    ("SDPA flash, padded", method_sdpa_padded),
    ("SDPA dense block mask", method_sdpa_dense),
]


def bench_shapes():
    return [
        ("8 conversations", conversation_batch(8, seed=0)),
        ("16 conversations", conversation_batch(16, seed=0)),
        ("16 conversations", conversation_batch(16, seed=1)),
        ("16k tokens", token_batch(16384, seed=0)),
    ]


def run_bench(out_lines, methods, dtype=torch.bfloat16):
    results = []
    out_lines += ["| batch | D | Hq/Hk | method | fwd ms | bwd ms | fwd+bwd ms | fwd TF/s | bwd TF/s | fwd+bwd TF/s "
                  "| ours speed-up (fwd+bwd) | fwd+bwd ms, CUDA graph | ours speed-up (graph) | note |",
                  "|" + "---|" * 14]
    for shape_name, lens in bench_shapes():
        for d, hq, hk in HEAD_CONFIGS:
            torch.manual_seed(0)
            q, k, v, cu = make_inputs(lens, hq, hk, d, dtype)
            flops = causal_flops(lens, hq, d)
            ours_both = ours_graph = None
            batch = f"{shape_name}: {len(lens)} seqs, {sum(lens)} tok, max {max(lens)}"
            for name, make in methods:
                try:
                    call, inputs, note = make(q, k, v, cu, lens)
                    fwd, bwd, both, graphed = time_method(call, inputs)
                    del call, inputs
                except Exception as exc:  # a baseline that cannot run this shape is reported, not fatal
                    fwd = bwd = both = graphed = float("nan")
                    note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                    torch.cuda.empty_cache()
                if name.startswith("ours"):
                    ours_both, ours_graph = both, graphed
                row = dict(batch=batch, d=d, hq=hq, hk=hk, method=name, fwd=fwd, bwd=bwd, both=both, graph=graphed,
                           fwd_tf=flops / fwd / 1e9, bwd_tf=2.5 * flops / bwd / 1e9, both_tf=3.5 * flops / both / 1e9,
                           speedup=(both / ours_both) if ours_both else float("nan"),
                           graph_speedup=(graphed / ours_graph) if ours_graph else float("nan"), note=note)
                results.append(row)
                out_lines.append(
                    f"| {batch} | {d} | {hq}/{hk} | {name} | {fwd:.3f} | {bwd:.3f} | {both:.3f} | {row['fwd_tf']:.0f} "
                    f"| {row['bwd_tf']:.0f} | {row['both_tf']:.0f} | {row['speedup']:.2f}x | {graphed:.3f} "
                    f"| {row['graph_speedup']:.2f}x | {note} |")
                print(out_lines[-1], flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------
# tuning
# ---------------------------------------------------------------------------

TUNE_SPACE = {  # around the best of a first, wider sweep (docs/kernel-notes.md)
    "fwd": [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 4), (32, 64, 4, 3), (128, 64, 8, 3)],
    "bwd_kv": [(32, 64, 4, 3), (32, 64, 4, 4), (32, 64, 4, 2), (16, 64, 4, 3), (32, 32, 4, 3), (32, 64, 8, 3)],
    "bwd_q": [(64, 32, 4, 3), (64, 32, 4, 4), (64, 32, 4, 2), (64, 16, 4, 3), (32, 32, 4, 3), (64, 32, 8, 3)],
}


def run_tune(out_lines, dtype=torch.bfloat16):
    """One kernel at a time, others fixed; totals over two shapes per head dim."""
    original = va_launch.select_config
    best_all = {}
    tune_shapes = [conversation_batch(16, seed=0), token_batch(16384, seed=0)]
    for d, hq, hk in [(64, 32, 8), (128, 16, 4)]:
        base = dict(va_launch.GPU_CONFIGS[d])
        inputs = []
        for lens in tune_shapes:
            q, k, v, cu = make_inputs(lens, hq, hk, d, dtype)
            inputs.append((q, k, v, cu, max(lens)))
        for kernel in ("fwd", "bwd_kv", "bwd_q"):
            timings = []
            for cfg in TUNE_SPACE[kernel]:
                trial = dict(base)
                trial[kernel] = cfg
                va_launch.select_config = lambda *a, _t=trial: _t
                total = 0.0
                try:
                    for q, k, v, cu, m in inputs:
                        if kernel == "fwd":
                            total += bench_ms(lambda: varlen_attention(q, k, v, cu, m))
                        else:
                            o = varlen_attention(q, k, v, cu, m)
                            do = torch.randn_like(o)
                            total += bench_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                except Exception as exc:
                    total = float("inf")
                    print(f"  {kernel} {cfg} failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                timings.append((total, cfg))
                print(f"  D={d} {kernel} {cfg}: {total:.3f} ms", flush=True)
            timings.sort()
            base[kernel] = timings[0][1]
            out_lines.append(f"D={d} {kernel}: best {timings[0][1]} {timings[0][0]:.3f} ms; "
                             + ", ".join(f"{c}={t:.3f}" for t, c in timings[1:]))
            print(out_lines[-1], flush=True)
        best_all[d] = base
    va_launch.select_config = original
    for d, cfg in best_all.items():
        va_launch.GPU_CONFIGS[d] = cfg
    out_lines.append("tuned: " + json.dumps({str(d): c for d, c in best_all.items()}))
    print(out_lines[-1], flush=True)
    return best_all


def environment_line():
    import triton

    props = torch.cuda.get_device_properties(0)
    return (f"{props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}, "
            f"CUDA {torch.version.cuda}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="bf16/fp16 correctness vs an fp32 reference")
    parser.add_argument("--quick", action="store_true", help="fewer --check cases")
    parser.add_argument("--tune", action="store_true", help="sweep block sizes (applied to this run's bench)")
    parser.add_argument("--bench", action="store_true", help="speed table (default when nothing else is asked)")
    parser.add_argument("--methods", default="all", help="comma list of method name prefixes, or 'all'")
    parser.add_argument("--out", default=None, help="folder for check.md / bench.md / bench.json")
    args = parser.parse_args()
    if not (args.check or args.tune or args.bench):
        args.bench = True
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    env = environment_line()
    print(env, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    def save(name, lines):
        if args.out:
            with open(os.path.join(args.out, name), "w") as f:
                f.write(env + "\n\n" + "\n".join(lines) + "\n")

    ok = True
    if args.tune:
        lines = []
        t0 = time.time()
        run_tune(lines)
        lines.append(f"tuning took {time.time() - t0:.0f} s")
        save("tune.md", lines)
    if args.check:
        lines = []
        ok = run_check(lines, quick=args.quick)
        save("check.md", lines)
    if args.bench:
        methods = METHODS if args.methods == "all" else [
            m for m in METHODS if any(m[0].lower().startswith(p.strip().lower()) for p in args.methods.split(","))]
        lines = []
        results = run_bench(lines, methods)
        save("bench.md", lines)
        if args.out:
            with open(os.path.join(args.out, "bench.json"), "w") as f:
                json.dump({"env": env, "results": results}, f, indent=1)
        print("\n" + env + "\n" + "\n".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
