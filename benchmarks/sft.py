"""End-to-end SFT benchmark: stock TRL, TRL's own options, peers, and unsloth_patch.

Every configuration trains in a fresh process (cuDNN and the caching allocator keep per-shape
state that makes later runs in one process look faster). Same model (built from a config with
a fixed seed), same real chat data in the same order, bf16, AdamW, batch 8, max_length 2048, one
epoch.

    python benchmarks/sft.py prepare --out benchmarks/out/data          # CPU: tokenizer + tokenized chats
    python benchmarks/sft.py all --data benchmarks/out/data --out OUT \
        --model llama --configs stock,trl_padding_free,trl_liger,trl_packing_bfd,unsloth_patch
    python benchmarks/sft.py report --results OUT --markdown docs/benchmark-training.md --png docs/...png

Metrics per configuration: real (non-pad) tokens/s over the whole run (compilation and warm-up
included) and in steady state (steps after the first 10%), peak GPU memory, loss at every step.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (import unsloth_patch first?, SFTConfig overrides, notes)
CONFIGS = {
    "stock": (False, {}, "TRL defaults: padded batches, sdpa, TRL's default checkpointing"),
    "trl_padding_free": (False, {"padding_free": True, "max_length": None},
                         "TRL padding_free=True on sdpa (data pre-truncated at 2048, so max_length=None is equivalent)"),
    "trl_liger": (False, {"use_liger_kernel": True}, "TRL + Liger kernels (use_liger_kernel=True)"),
    "trl_packing_bfd": (False, {"packing": True, "packing_strategy": "bfd"}, "TRL bfd packing"),
    "unsloth": (False, {"gradient_accumulation_steps": 1, "optim": "adamw_torch_fused", "weight_decay": 0.0,
                         "warmup_steps": 0, "lr_scheduler_type": "linear"},
                "Unsloth FastLanguageModel, full fine-tuning: its padding-free, compiled blocks and offloaded "
                "checkpointing; optimizer settings aligned with stock TRL"),
    "unsloth_patch": (True, {}, "import unsloth_patch, the stock script unchanged"),
    "unsloth_patch_packing": (True, {"packing": True, "packing_strategy": "bfd"},
                              "import unsloth_patch + TRL bfd packing"),
    "unsloth_patch_plain_ckpt": (True, {}, "import unsloth_patch with UNSLOTH_PATCH_CHECKPOINTING=off "
                                 "(TRL's default plain checkpointing kept)"),
    "unsloth_patch_12gb": (True, {}, "import unsloth_patch with UNSLOTH_PATCH_MEMORY_BUDGET_GB=12 "
                           "(memory-matched to the peers)"),
}
# Environment of a configuration's process, besides the plugin's DISABLE for peers.
CONFIG_ENV = {
    "unsloth_patch_plain_ckpt": {"UNSLOTH_PATCH_CHECKPOINTING": "off"},
    "unsloth_patch_12gb": {"UNSLOTH_PATCH_MEMORY_BUDGET_GB": "12"},
}
PEERS = ("trl_padding_free", "trl_liger", "trl_packing_bfd", "unsloth")


# ----------------------------------------------------------------------------------- data

def prepare(out: pathlib.Path, vocab_size: int, max_length: int, limit: int | None) -> None:
    """Train a 32k BPE on the chitchat conversations and store them tokenized (truncated)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import chitchat_dataset
    from make_chat_sample import convert

    from unsloth_patch.tiny import build_tokenizer

    conversations = [c for c in (convert(v, max_turns=None) for v in chitchat_dataset.Dataset().values()) if c]
    if limit:
        conversations = conversations[:limit]
    texts = [m["content"] for c in conversations for m in c]
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    total = 0
    with open(out / "chats.jsonl", "w") as f:
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(conversation, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = list(ids)[:max_length]
            total += len(ids)
            f.write(json.dumps({"input_ids": ids}) + "\n")
    print(f"{len(conversations)} conversations, {total} tokens after truncation at {max_length} -> {out}")


def load_rows(data: pathlib.Path, min_tokens: int):
    rows, total = [], 0
    with open(data / "chats.jsonl") as f:
        for line in f:
            row = json.loads(line)
            rows.append(row)
            total += len(row["input_ids"])
            if total >= min_tokens:
                break
    return rows, total


# ----------------------------------------------------------------------------------- one run

def run_one(args) -> dict:
    patched, overrides, notes = CONFIGS[args.config]
    if patched:
        import unsloth_patch  # noqa: F401  (the one line a user adds)
    elif os.environ.get("UNSLOTH_PATCH_DISABLE") != "1":
        raise SystemExit("run peers with UNSLOTH_PATCH_DISABLE=1 (the `all` command does)")
    if args.config == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers/trl)
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from unsloth_patch.collate import real_token_count
    from unsloth_patch.tiny import build_llama_1b_config, build_qwen2_1b_config, model_from_config

    data = pathlib.Path(args.data)
    rows, real_tokens = load_rows(data, args.min_tokens)
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    config = (build_llama_1b_config if args.model == "llama" else build_qwen2_1b_config)()
    torch.manual_seed(0)
    if args.config == "unsloth":
        from unsloth import FastLanguageModel

        model_dir = pathlib.Path(args.model_dir) / args.model
        if not (model_dir / "config.json").exists():
            model_from_config(config, dtype=torch.bfloat16, seed=0).save_pretrained(model_dir)
        if not (model_dir / "tokenizer_config.json").exists():  # FastLanguageModel loads the tokenizer from there
            tokenizer.save_pretrained(model_dir)
        model, _ = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=args.max_length,
                                                     dtype=torch.bfloat16, load_in_4bit=False,
                                                     full_finetuning=True)
    else:
        model = model_from_config(config, dtype=torch.bfloat16, seed=0, device="cuda")

    values = dict(output_dir=str(pathlib.Path(args.out).parent / f"ckpt-{args.config}"),
                  per_device_train_batch_size=args.batch_size, num_train_epochs=1, max_length=args.max_length,
                  bf16=True, learning_rate=2e-5, logging_steps=1, report_to="none", save_strategy="no",
                  seed=0, dataloader_num_workers=0, disable_tqdm=True)
    values.update(overrides)
    sft_args = SFTConfig(**values)
    step_times, step_tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            step_times.append([time.perf_counter(), None])

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            step_times[-1][1] = time.perf_counter()

    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Timer()])
    inner = trainer.data_collator

    def counting(features, *a, **k):
        batch = inner(features, *a, **k)
        step_tokens.append(real_token_count(batch))
        return batch

    trainer.data_collator = counting
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    output = trainer.train()
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    steps = len(step_times)
    micro = max(1, int(trainer.args.gradient_accumulation_steps))  # collator calls per optimizer step
    tokens = sum(step_tokens[:steps * micro])
    skip = max(1, steps // 10)
    steady_time = sum(b - a for a, b in step_times[skip:])
    steady_tokens = sum(step_tokens[skip * micro:steps * micro])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "config": args.config, "model": args.model + args.tag, "notes": notes, "batch_size": args.batch_size,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps, "real_tokens": tokens, "dataset_tokens": real_tokens,
        "train_runtime_s": output.metrics.get("train_runtime", wall), "wall_s": wall,
        "tokens_per_s_whole": tokens / output.metrics.get("train_runtime", wall),
        "tokens_per_s_steady": steady_tokens / steady_time if steady_time else None,
        "first_steps_s": sum(b - a for a, b in step_times[:skip]),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "losses": losses, "final_loss": losses[-1] if losses else None,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "gradient_accumulation_steps": micro, "optim": str(trainer.args.optim),
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
        "collator": type(trainer.data_collator).__name__ if not callable(inner) else type(inner).__name__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "cuda": torch.version.cuda},
        "card": torch.cuda.get_device_name(0),
    }
    if patched:
        import unsloth_patch

        plan = unsloth_patch.last_plan()
        result["plan"] = plan.as_dict() if plan else None
        import dataclasses

        from unsloth_patch import checkpointing

        decision = checkpointing.last_decision()
        result["checkpointing"] = dataclasses.asdict(decision) if decision is not None else None
    return result


# ----------------------------------------------------------------------------------- driver

def run_all(args) -> None:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(rep, name) for rep in range(args.repeat) for name in args.configs.split(",")]  # interleaved
    for rep, name in runs:
        suffix = f"-r{rep + 1}" if args.repeat > 1 else ""
        target = out / f"{args.model}{args.tag}-{name}{suffix}.json"
        cmd = [sys.executable, __file__, "run", "--config", name, "--model", args.model, "--data", args.data,
               "--out", str(target), "--min-tokens", str(args.min_tokens), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--model-dir", args.model_dir, f"--tag={args.tag}"]
        print(f"== {name}", flush=True)
        started = time.time()
        env = dict(os.environ)
        if not CONFIGS[name][0]:  # importing unsloth_patch.tiny must not activate the plugin for peers
            env["UNSLOTH_PATCH_DISABLE"] = "1"
        env.update(CONFIG_ENV.get(name, {}))
        # every configuration pays its own Triton compilation, as a user's first run does
        env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"triton-{name}-")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            (out / f"{args.model}{args.tag}-{name}.log").write_text(proc.stdout[-20000:] + "\n" + proc.stderr[-20000:])
            print(f"   FAILED ({proc.returncode}) after {time.time() - started:.0f}s:\n{proc.stderr[-2500:]}")
            target.write_text(json.dumps({"config": name, "model": args.model, "error": proc.stderr[-4000:]}))
        else:
            r = json.loads(target.read_text())
            policy = (r.get("checkpointing") or {}).get("policy")
            print(f"   checkpointing policy: {policy}" if policy else "   ", end="")
            print(f"   whole {r['tokens_per_s_whole']:.0f} tok/s, steady {r['tokens_per_s_steady']:.0f} tok/s, "
                  f"peak {r['peak_gib']:.1f} GiB, final loss {r['final_loss']:.4f}, {time.time() - started:.0f}s",
                  flush=True)
    print(report(out, None, None))


def report(results: pathlib.Path, markdown, png) -> str:
    repeats = {}
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        repeats.setdefault(r["model"], {}).setdefault(r["config"], []).append(r)
    runs = {model: {name: _median_run(rs) for name, rs in by.items()} for model, by in repeats.items()}
    lines = []
    for model, by_name in runs.items():
        ok = {k: v for k, v in by_name.items() if "error" not in v}
        stock = ok.get("stock")
        peers = {k: v for k, v in ok.items() if k in PEERS}
        best_peer = max(peers.values(), key=lambda v: v["tokens_per_s_steady"] or 0) if peers else None
        some = next(iter(ok.values()), None)
        if some:
            lines.append(f"### {model} ({some['params'] / 1e9:.2f}B parameters) — {some['card']}, "
                         f"torch {some['versions']['torch']}, transformers {some['versions']['transformers']}, "
                         f"TRL {some['versions']['trl']}\n")
        lines.append("| configuration | whole-run tok/s | steady tok/s | x stock (whole) | x stock (steady) | "
                     f"x best peer{' (' + best_peer['config'] + ')' if best_peer else ''} (steady) | "
                     "peak GiB | final loss | max rel. loss diff vs stock |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name in CONFIGS:
            r = by_name.get(name)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'].strip().splitlines()[-1][:120]} |||||||| ")
                continue
            whole, steady = r["tokens_per_s_whole"], r["tokens_per_s_steady"]
            diff = ""
            if stock and r["losses"] and not r["config"].endswith("packing_bfd") and "packing" not in name:
                pairs = list(zip(stock["losses"], r["losses"]))
                diff = f"{max(abs(a - b) / abs(a) for a, b in pairs):.2%}" if pairs else ""
            if r.get("runs", 1) > 1:
                name = f"{name} (median of {r['runs']})"
            vs_stock = (f"{whole / stock['tokens_per_s_whole']:.2f}x | {steady / stock['tokens_per_s_steady']:.2f}x"
                        if stock else " | ")
            vs_peer = f"{steady / best_peer['tokens_per_s_steady']:.2f}x" if best_peer else ""
            lines.append(f"| {name} | {whole:,.0f} | {steady:,.0f} | {vs_stock} | {vs_peer} | {r['peak_gib']:.1f} | "
                         f"{r['final_loss']:.4f} | {diff} |")
        lines.append("")
    text = "\n".join(lines)
    if markdown:
        pathlib.Path(markdown).write_text(text + "\n")
    if png:
        _plot(runs, png)
    return text


def _median_run(results: list) -> dict:
    """One result per configuration: the median run by whole-run throughput, with medians and ranges."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    ok.sort(key=lambda r: r["tokens_per_s_whole"])
    chosen = dict(ok[len(ok) // 2])
    for key in ("tokens_per_s_whole", "tokens_per_s_steady"):
        values = [r[key] for r in ok]
        chosen[key] = statistics.median(values)
        chosen[key + "_range"] = (min(values), max(values))
    chosen["runs"] = len(ok)
    return chosen


def _plot(runs, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(runs)
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.2 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        ok = [(n, runs[model][n]) for n in CONFIGS if n in runs[model] and "error" not in runs[model][n]]
        names = [n for n, _ in ok]
        whole = [r["tokens_per_s_whole"] / 1e3 for _, r in ok]
        steady = [r["tokens_per_s_steady"] / 1e3 for _, r in ok]
        ax = axes[row][0]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], whole, width=0.4, label="whole run")
        ax.bar([x + 0.2 for x in xs], steady, width=0.4, label="steady state")
        ax.set_xticks(list(xs), names, rotation=25, ha="right")
        ax.set_ylabel("real tokens/s (thousands)")
        ax.set_title(f"{model}: throughput")
        ax.legend()
        ax = axes[row][1]
        for name, r in ok:
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=name, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"{model}: loss per step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "run", "all", "report"])
    parser.add_argument("--data", default=str(HERE / "out" / "data"))
    parser.add_argument("--out", default=str(HERE / "out" / "results"))
    parser.add_argument("--config", choices=list(CONFIGS))
    parser.add_argument("--configs", default="stock,trl_padding_free,trl_liger,trl_packing_bfd,unsloth_patch")
    parser.add_argument("--model", choices=["llama", "qwen2"], default="llama")
    parser.add_argument("--model-dir", default=str(HERE / "out" / "models"))
    parser.add_argument("--min-tokens", type=int, default=500_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="run every configuration N times, interleaved; "
                        "the report takes medians")
    parser.add_argument("--tag", default="", help="suffix for result files (e.g. b32 for a batch-size sweep)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--results", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(pathlib.Path(args.out), args.vocab_size, args.max_length, args.limit)
    elif args.command == "run":
        result = run_one(args)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    elif args.command == "all":
        run_all(args)
    else:
        print(report(pathlib.Path(args.results or args.out), args.markdown, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
