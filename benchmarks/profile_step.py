"""Where a training step's time goes: torch profiler over steady steps, by kernel class.

    python benchmarks/profile_step.py --config unsloth_patch --data benchmarks/out/data --out OUT/profile.json
    python benchmarks/profile_step.py --config stock ...                 # the same for stock TRL, a peer, ...

Runs the benchmark's configuration (``benchmarks/sft.py``: same model, data, SFTConfig, process) for
``--warmup`` steps untraced, then ``--steps`` steps under ``torch.profiler``, and sums device time per
kernel class: matrix products, attention forward and backward, norms, activations, rotary embeddings,
elementwise adds, loss, optimizer, copies, the rest; plus the step's wall time not covered by device
work (CPU gaps between launches) and the number of kernel launches per step. Prints a markdown table
and writes the JSON (``report`` turns several JSONs into one table: ours against stock and peers).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent

# First match wins; patterns are searched in lower-cased kernel names.
CLASSES = (
    ("attention backward", r"_bwd_|flash_bwd|attention_backward|efficient_attention_backward|fmha.*bwd|dq_|dkdv|"
                           r"sdpa.*bprop"),  # cuDNN's SDPA backward is "..._sdpa_..._flash_bprop_..."
    ("attention forward", r"_fwd_kernel|flash_fwd|attention_forward|efficient_attention_forward|fmha|sdpa"),
    ("optimizer", r"adam|multi_tensor|foreach|lion|sgd|fused_adamw"),
    ("loss", r"cross_entropy|log_softmax|logsoftmax|nll_loss|logsumexp|chunked_logprob|softmax"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|matmul|_mm_|ampere_|hopper"),
    ("norm", r"rms|layer_norm|_norm_|rsqrt"),
    ("activation", r"_gated_|silu|gelu|swiglu|geglu|sigmoid"),
    ("rotary", r"rotary|rope|_cos|_sin|neg_kernel|cat_"),
    ("copies", r"memcpy|memset|copy_|_to_copy|contiguous|cat|index_|gather|scatter|fill_"),
    ("elementwise add / mul", r"add|mul|vectorized_elementwise|elementwise"),
)


def classify(name: str) -> str:
    lowered = name.lower()
    for label, pattern in CLASSES:
        if re.search(pattern, lowered):
            return label
    return "other"


def _device_us(event, on_gpu: bool) -> float:
    """The event's own device time (GPU kernels), or on a CPU-only run its own CPU time (aten ops)."""
    if on_gpu:
        if str(getattr(event, "device_type", "")).lower().endswith("cpu"):
            return 0.0
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "device_time_total", 0.0) or 0.0)
    return float(getattr(event, "self_cpu_time_total", 0.0) or 0.0) if event.key.startswith("aten::") else 0.0


def summarize(events, steps: int, wall_s: float, on_gpu: bool = True) -> dict:
    """Device time per class per step (ms), launches per step, and the CPU gap per step."""
    by_class: dict = {}
    launches = 0
    device_us = 0.0
    for event in events:
        duration = _device_us(event, on_gpu)
        if not duration:
            continue
        label = classify(event.key)
        by_class[label] = by_class.get(label, 0.0) + duration
        launches += getattr(event, "count", 1)
        device_us += duration
    step_ms = 1000 * wall_s / max(steps, 1)
    per_step = {label: us / 1000 / max(steps, 1) for label, us in sorted(by_class.items(), key=lambda kv: -kv[1])}
    device_ms = device_us / 1000 / max(steps, 1)
    return {"step_ms": step_ms, "device_ms": device_ms, "cpu_gap_ms": max(0.0, step_ms - device_ms),
            "launches_per_step": launches / max(steps, 1), "by_class_ms": per_step}


def table(results: dict) -> str:
    labels = [label for label, _ in CLASSES] + ["other"]
    names = list(results)
    lines = ["| kernel class (ms per step) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{results[n]['by_class_ms'].get(label, 0.0):.2f}" for n in names)
                     + " |")
    for key, title in (("device_ms", "device total"), ("cpu_gap_ms", "CPU gaps (wall - device)"),
                       ("step_ms", "step wall time"), ("launches_per_step", "kernel launches per step")):
        lines.append(f"| {title} | " + " | ".join(f"{results[n][key]:.1f}" for n in names) + " |")
    return "\n".join(lines)


def run(args) -> dict:
    sys.path.insert(0, str(HERE))
    import sft  # the benchmark's configurations, model and data
    import torch
    from transformers import TrainerCallback

    config = sft.CONFIGS[args.config]
    if config.patched:
        import unsloth_patch  # noqa: F401
    trainer = sft.build_trainer(args, config)
    state = {"step": 0, "prof": None, "start": None}
    total = args.warmup + args.steps
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])

    class Profile(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if state["step"] == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                state["prof"] = torch.profiler.profile(activities=activities)
                state["prof"].__enter__()
                state["start"] = time.perf_counter()

        def on_step_end(self, args_, state_, control, **k):
            state["step"] += 1
            if state["step"] == total and state["prof"] is not None:
                if cuda:
                    torch.cuda.synchronize()
                state["wall"] = time.perf_counter() - state["start"]
                state["prof"].__exit__(None, None, None)
                control.should_training_stop = True

    trainer.add_callback(Profile())
    trainer.args.max_steps = total
    trainer.train()
    events = state["prof"].key_averages()
    result = summarize(events, args.steps, state["wall"], on_gpu=cuda)
    ranked = sorted(events, key=lambda e: -_device_us(e, cuda))[:25]
    if config.patched:
        result["package"] = str(pathlib.Path(sys.modules["unsloth_patch"].__file__).parent)
    result.update(config=args.config, model=args.model, card=torch.cuda.get_device_name(0) if cuda else "cpu",
                  steps=args.steps, warmup=args.warmup, date=time.strftime("%Y-%m-%d"),
                  top=[(e.key, _device_us(e, cuda) / 1000 / args.steps) for e in ranked],
                  host_top=[(e.key, float(e.self_cpu_time_total) / 1000 / args.steps, e.count // args.steps)
                            for e in sorted(events, key=lambda e: -float(e.self_cpu_time_total or 0))[:40]])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "report"])
    parser.add_argument("--config", default="unsloth_patch")
    parser.add_argument("--model", default="llama")
    parser.add_argument("--data", default=str(HERE / "out" / "data"))
    parser.add_argument("--model-dir", default=str(HERE / "out" / "models"))
    parser.add_argument("--out", default=str(HERE / "out" / "profile.json"))
    parser.add_argument("--results", nargs="*", default=[])
    parser.add_argument("--min-tokens", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=10, help="untraced steps first (compilation, warm-up)")
    parser.add_argument("--steps", type=int, default=10, help="traced steps")
    args = parser.parse_args(argv)
    if args.command == "report":
        results = {json.loads(pathlib.Path(p).read_text())["config"]: json.loads(pathlib.Path(p).read_text())
                   for p in args.results}
        print(table(results))
        return 0
    result = run(args)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(table({args.config: result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
