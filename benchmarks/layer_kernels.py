"""GPU check and benchmark of the fused RMSNorm / SwiGLU / GeGLU kernels and of their wiring.

    python benchmarks/layer_kernels.py                 # everything, printed as markdown tables
    python benchmarks/layer_kernels.py --json OUT.json # also write the numbers
    python benchmarks/layer_kernels.py --skip-model    # kernels only

1. Correctness in bf16: forward and gradients of each kernel against an fp32 PyTorch reference
   on the same inputs (relative error ``||ours - ref|| / ||ref||``, must be <= 1e-2), next to
   the same error of the eager bf16 PyTorch spelling for scale.
2. Speed: median of ``triton.testing.do_bench`` for forward and forward+backward at T=8192
   tokens, hidden 2048 (RMSNorm) and intermediate 8192 (SwiGLU/GeGLU), ours vs eager PyTorch.
3. One forward+backward of the 1.1B Llama-shaped model (16 layers, bf16) on a padding-free
   batch of ~8k real-length chat tokens with the ``unsloth_varlen`` attention, with and
   without fused layers, with and without (non-reentrant) gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from unsloth_patch.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402
from unsloth_patch.kernels.swiglu import gated_activation  # noqa: E402

LENGTHS_FILE = os.path.join(HERE, "chitchat_lengths.json")


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def eager_rmsnorm(x, w, eps=1e-6):
    return rms_norm_reference(x, w, eps, 0.0)


def eager_gated(g, u, activation):
    if activation == "silu":
        return torch.nn.functional.silu(g) * u
    return torch.nn.functional.gelu(g, approximate="tanh") * u


def fwd_bwd(fn, inputs, dy):
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(dy)
    return run


def bench(fn, rep=200):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def sweep_rmsnorm_backward(results):
    """Time RMSNorm forward+backward per backward launch configuration; keep the fastest."""
    from unsloth_patch.kernels import rmsnorm

    default = dict(rmsnorm.BACKWARD)
    configs = [("2-D row blocks", {"rows_kernel_min_n": 1 << 30, "programs_per_sm": 4})]
    for pps in (1, 2, 4, 8):
        for warps in (4, 8, 16):
            configs.append((f"rows, {pps}/SM, {warps} warps",
                            {"rows_kernel_min_n": 512, "programs_per_sm": pps, "row_warps": warps}))
    shapes = {"8192x2048": (8192, 2048), "262144x128 (per-head)": (8192 * 32, 128)}
    table = {}
    for shape_name, (m, n) in shapes.items():
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16).requires_grad_()
        w = (1 + 0.1 * torch.randn(n, device="cuda", dtype=torch.bfloat16)).requires_grad_()
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        for name, config in configs:
            if n < 512 and config["rows_kernel_min_n"] == 512 and config.get("row_warps") != 4:
                continue
            if n < 512:  # the per-head shape always takes the 2-D kernel: sweep its program count
                config = {"rows_kernel_min_n": 1 << 30, "programs_per_sm": config["programs_per_sm"]}
                name = f"2-D row blocks, {config['programs_per_sm']}/SM"
            rmsnorm.BACKWARD.update(default)
            rmsnorm.BACKWARD.update(config)
            table.setdefault(name, {})[shape_name] = bench(fwd_bwd(lambda: rms_norm(x, w, 1e-6), (x, w), dy))
    rmsnorm.BACKWARD.update(default)
    print("\n### RMSNorm forward+backward per backward launch configuration (ms, median, bf16)\n")
    print("| configuration | " + " | ".join(shapes) + " |")
    print("| --- | " + " | ".join("---" for _ in shapes) + " |")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[s]:.3f}" if s in row else "" for s in shapes) + " |")
    big = "8192x2048"
    best = min((row[big], name) for name, row in table.items() if big in row and name.startswith("rows"))[1]
    pps, warps = best.split(", ")[1].split("/")[0], best.split(", ")[2].split()[0]
    rmsnorm.BACKWARD.update({"rows_kernel_min_n": 512, "programs_per_sm": int(pps), "row_warps": int(warps)})
    print(f"\nused below: {rmsnorm.BACKWARD}")
    results["rmsnorm_backward_sweep"] = table
    results["rmsnorm_backward_used"] = dict(rmsnorm.BACKWARD)


def kernel_section(results):
    torch.manual_seed(0)
    t, hidden, inter = 8192, 2048, 8192
    rows = []
    sweep_rmsnorm_backward(results)

    # RMSNorm
    x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    dy = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
    x32 = x.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    ref = eager_rmsnorm(x32, w32)
    ref.backward(dy.float())
    checks = {}
    for name, fn in (("ours", lambda: rms_norm(x, w, 1e-6)), ("eager bf16", lambda: eager_rmsnorm(x, w))):
        x.grad = w.grad = None
        y = fn()
        y.backward(dy)
        checks[name] = (rel(y, ref), rel(x.grad, x32.grad), rel(w.grad, w32.grad))
    rows.append(("RMSNorm", checks))
    timing = {
        "rmsnorm": {
            "ours_fwd": bench(lambda: rms_norm(x, w, 1e-6)),
            "eager_fwd": bench(lambda: eager_rmsnorm(x, w)),
            "ours_fwd_bwd": bench(fwd_bwd(lambda: rms_norm(x, w, 1e-6), (x, w), dy)),
            "eager_fwd_bwd": bench(fwd_bwd(lambda: eager_rmsnorm(x, w), (x, w), dy)),
        }
    }

    # SwiGLU / GeGLU
    g = (2 * torch.randn(t, inter, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    u = torch.randn(t, inter, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dh = torch.randn(t, inter, device="cuda", dtype=torch.bfloat16)
    for activation, label in (("silu", "SwiGLU"), ("gelu_tanh", "GeGLU")):
        g32 = g.detach().float().requires_grad_()
        u32 = u.detach().float().requires_grad_()
        ref = eager_gated(g32, u32, activation)
        ref.backward(dh.float())
        checks = {}
        for name, fn in (("ours", lambda: gated_activation(g, u, activation)),
                         ("eager bf16", lambda: eager_gated(g, u, activation))):
            g.grad = u.grad = None
            y = fn()
            y.backward(dh)
            checks[name] = (rel(y, ref), rel(g.grad, g32.grad), rel(u.grad, u32.grad))
        rows.append((label, checks))
        timing[label.lower()] = {
            "ours_fwd": bench(lambda: gated_activation(g, u, activation)),
            "eager_fwd": bench(lambda: eager_gated(g, u, activation)),
            "ours_fwd_bwd": bench(fwd_bwd(lambda: gated_activation(g, u, activation), (g, u), dh)),
            "eager_fwd_bwd": bench(fwd_bwd(lambda: eager_gated(g, u, activation), (g, u), dh)),
        }

    print("\n### bf16 correctness (relative error vs fp32 reference; output, grad 1, grad 2)\n")
    print("| kernel | ours | eager bf16 | ours <= 1e-2 |")
    print("| --- | --- | --- | --- |")
    ok_all = True
    for label, checks in rows:
        ours, eager = checks["ours"], checks["eager bf16"]
        ok = max(ours) <= 1e-2
        ok_all &= ok
        print(f"| {label} | {', '.join(f'{v:.1e}' for v in ours)} | {', '.join(f'{v:.1e}' for v in eager)} | "
              f"{'yes' if ok else 'NO'} |")
    print("\n### kernel time (ms, median; T=8192, hidden 2048 / intermediate 8192, bf16)\n")
    print("| kernel | ours fwd | eager fwd | speedup | ours fwd+bwd | eager fwd+bwd | speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, tm in timing.items():
        print(f"| {label} | {tm['ours_fwd']:.3f} | {tm['eager_fwd']:.3f} | {tm['eager_fwd'] / tm['ours_fwd']:.2f}x | "
              f"{tm['ours_fwd_bwd']:.3f} | {tm['eager_fwd_bwd']:.3f} | "
              f"{tm['eager_fwd_bwd'] / tm['ours_fwd_bwd']:.2f}x |")
    results["correctness"] = {label: checks for label, checks in rows}
    results["correct"] = ok_all
    results["kernels_ms"] = timing


def token_batch(total, seed=0, cap=2048):
    with open(LENGTHS_FILE) as f:
        pool = json.load(f)["lengths"]
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(cap, rng.choice(pool)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def llama_training_step(tokens):
    """The 1.1B Llama (bf16, CUDA, ``unsloth_varlen`` attention, train mode), a padding-free batch of
    about ``tokens`` real tokens, and ``step()``: one forward + backward with fresh gradients, which
    the kernel benchmarks time. Returns ``(model, lengths, step)``."""
    from unsloth_patch.attention.registration import install
    from unsloth_patch.collate import boundaries_from_lengths
    from unsloth_patch.tiny import build_llama_1b_config, model_from_config

    install(None)
    model = model_from_config(build_llama_1b_config(), dtype=torch.bfloat16, device="cuda")
    model.set_attn_implementation("unsloth_varlen")
    model.config.use_cache = False
    model.train()
    lengths = token_batch(tokens)
    total = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (1, total), generator=gen).cuda()
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
    boundaries = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in boundaries_from_lengths(lengths).items()}
    batch = dict(input_ids=input_ids, labels=input_ids.clone(), position_ids=position_ids, **boundaries)

    def step():
        for p in model.parameters():
            p.grad = None
        out = model(**batch)
        out.loss.backward()
        return out.loss

    return model, lengths, step


def model_section(results, tokens, rep):
    from unsloth_patch.edits import Edits
    from unsloth_patch.layers import fuse_model_layers, last_fusion
    from unsloth_patch.settings import Settings

    model, lengths, step = llama_training_step(tokens)
    total = sum(lengths)
    rows = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for fused in (False, True):
            edits = Edits()
            if fused:
                fuse_model_layers(model, Settings(), edits)
                assert last_fusion()["fused"], last_fusion()
            torch.cuda.synchronize()
            loss = step().item()
            torch.cuda.reset_peak_memory_stats()
            ms = bench(step, rep=rep)
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows[(checkpointing, fused)] = (ms, loss, peak)
            edits.rollback()
    print(f"\n### 1.1B Llama, one forward+backward, {total} tokens in {len(lengths)} sequences (ms, median)\n")
    print(f"fused: {last_fusion()['fused']}\n")
    print("| checkpointing | eager layers | fused layers | speedup | tokens/s fused | loss eager / fused | peak GiB eager / fused |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for checkpointing in (False, True):
        e, f = rows[(checkpointing, False)], rows[(checkpointing, True)]
        print(f"| {'non-reentrant' if checkpointing else 'off'} | {e[0]:.1f} | {f[0]:.1f} | {e[0] / f[0]:.3f}x | "
              f"{total / f[0] * 1e3:,.0f} | {e[1]:.4f} / {f[1]:.4f} | {e[2]:.1f} / {f[2]:.1f} |")
    results["model"] = {("ckpt" if c else "no_ckpt") + ("_fused" if f else "_eager"): v for (c, f), v in rows.items()}
    results["model_tokens"] = total


def device_results() -> dict:
    """Print the card and versions a kernel benchmark ran on; the start of its results."""
    import transformers
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}, CUDA {torch.version.cuda}")
    return {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rep", type=int, default=1500, help="do_bench milliseconds per model configuration")
    args = parser.parse_args()
    results = device_results()
    kernel_section(results)
    if not args.skip_model:
        model_section(results, args.tokens, args.rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
