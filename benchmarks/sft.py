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
included) and in steady state (wall-clock over the steps after the first 10%, the host work between
them included; ``metrics.py``), peak GPU memory, loss at every step.
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
from dataclasses import dataclass, field
from typing import Optional

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

@dataclass(frozen=True)
class Config:
    """One benchmark configuration: who runs the user's script, and how."""

    patched: bool  # import unsloth_patch first
    notes: str
    overrides: dict = field(default_factory=dict)  # SFTConfig values besides the common ones
    env: dict = field(default_factory=dict)  # environment of the run's process
    adapter: Optional[str] = None  # "lora": r=16 on every linear layer
    quant: Optional[str] = None  # "nf4": bitsandbytes 4-bit base (QLoRA)
    loader: str = "transformers"  # or "unsloth": FastLanguageModel
    match: Optional[str] = None  # UNSLOTH_PATCH_MEMORY_BUDGET_GB = this configuration's measured peak


_UNSLOTH_OPTIM = {"gradient_accumulation_steps": 1, "optim": "adamw_torch_fused", "weight_decay": 0.0,
                  "warmup_steps": 0, "lr_scheduler_type": "linear"}
CONFIGS = {
    "stock": Config(False, "TRL defaults: padded batches, sdpa, TRL's default checkpointing"),
    "trl_padding_free": Config(False, "TRL padding_free=True on sdpa (data pre-truncated at 2048, so "
                               "max_length=None is equivalent)", {"padding_free": True, "max_length": None}),
    "trl_liger": Config(False, "TRL + Liger kernels (use_liger_kernel=True)", {"use_liger_kernel": True}),
    "trl_packing_bfd": Config(False, "TRL bfd packing", {"packing": True, "packing_strategy": "bfd"}),
    "unsloth": Config(False, "Unsloth FastLanguageModel, full fine-tuning: its padding-free, compiled blocks and "
                      "offloaded checkpointing; optimizer settings aligned with stock TRL", dict(_UNSLOTH_OPTIM),
                      loader="unsloth"),
    "unsloth_packing": Config(False, "Unsloth with packing=True", {**_UNSLOTH_OPTIM, "packing": True},
                              loader="unsloth"),
    "unsloth_patch": Config(True, "import unsloth_patch, the stock script unchanged"),
    "unsloth_patch_packing": Config(True, "import unsloth_patch + packing=True (TRL's bfd packer, boundaries added)",
                                    {"packing": True, "packing_strategy": "bfd"}),
    "unsloth_patch_plain_ckpt": Config(True, "import unsloth_patch with UNSLOTH_PATCH_CHECKPOINTING=off (TRL's "
                                       "default plain checkpointing kept)", env={"UNSLOTH_PATCH_CHECKPOINTING": "off"}),
    "unsloth_patch_budget": Config(True, "import unsloth_patch with UNSLOTH_PATCH_MEMORY_BUDGET_GB = Unsloth's "
                                   "peak measured in the same call (memory-matched)", match="unsloth"),
    "unsloth_patch_12gb": Config(True, "import unsloth_patch with UNSLOTH_PATCH_MEMORY_BUDGET_GB=12",
                                 env={"UNSLOTH_PATCH_MEMORY_BUDGET_GB": "12"}),
    "stock_lora": Config(False, "TRL + PEFT LoRA r=16 on every linear layer", adapter="lora"),
    "unsloth_lora": Config(False, "Unsloth 16-bit LoRA r=16 on every linear layer", dict(_UNSLOTH_OPTIM),
                           adapter="lora", loader="unsloth"),
    "unsloth_patch_lora": Config(True, "import unsloth_patch + LoRA r=16", adapter="lora"),
    "unsloth_patch_lora_budget": Config(True, "import unsloth_patch + LoRA, budget = Unsloth LoRA's peak",
                                        adapter="lora", match="unsloth_lora"),
    "stock_qlora": Config(False, "TRL + PEFT QLoRA: nf4 base (double quant), LoRA r=16", adapter="lora",
                          quant="nf4"),
    "unsloth_qlora": Config(False, "Unsloth QLoRA: 4-bit base, LoRA r=16", dict(_UNSLOTH_OPTIM), adapter="lora",
                            quant="nf4", loader="unsloth"),
    "unsloth_patch_qlora": Config(True, "import unsloth_patch + QLoRA", adapter="lora", quant="nf4"),
    "unsloth_patch_qlora_budget": Config(True, "import unsloth_patch + QLoRA, budget = Unsloth QLoRA's peak",
                                         adapter="lora", quant="nf4", match="unsloth_qlora"),
    "unsloth_patch_qlora_dense": Config(True, "import unsloth_patch + QLoRA, UNSLOTH_PATCH_DENSE_4BIT=auto (4-bit "
                                        "weights kept dense where the budget has room; the default since "
                                        "2026-12-07)", adapter="lora", quant="nf4",
                                        env={"UNSLOTH_PATCH_DENSE_4BIT": "auto"}),
    "unsloth_patch_qlora_per_call": Config(True, "import unsloth_patch + QLoRA, UNSLOTH_PATCH_DENSE_4BIT=off (4-bit "
                                           "weights dequantised in every call)", adapter="lora", quant="nf4",
                                           env={"UNSLOTH_PATCH_DENSE_4BIT": "off"}),
}
PEERS = ("trl_padding_free", "trl_liger", "trl_packing_bfd", "unsloth", "unsloth_packing", "unsloth_lora",
         "unsloth_qlora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = ("llama", "qwen2", "qwen3", "tiny")
# --launch: the accelerate config files of docs/distributed.md; FSDP2 shards each decoder layer
LAUNCHES = ("ddp", "fsdp2")
DECODER_LAYERS = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer", "qwen3": "Qwen3DecoderLayer",
                  "tiny": "LlamaDecoderLayer"}


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

def _model_config(name: str, vocab_size: int):
    from unsloth_patch import tiny

    if name == "tiny":  # CPU smoke runs of the harness itself
        return tiny.build_model("llama", vocab_size=vocab_size, hidden_size=64, num_layers=2).config
    return getattr(tiny, f"build_{name}_1b_config")()  # looked up by name: older builds (--patch-path) lack some


def _load_model(config: Config, args, model_config, tokenizer, device):
    """The model as the configuration's user would load it (saved once, seeded, for loaders that read files)."""
    import torch

    from unsloth_patch.tiny import model_from_config

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if config.loader == "transformers" and config.quant is None and not device.startswith("cuda"):
        return model_from_config(model_config, dtype=dtype, seed=0, device=device)  # CPU runs of the harness
    model_dir = pathlib.Path(args.model_dir) / args.model
    if not (model_dir / "config.json").exists():
        model_from_config(model_config, dtype=dtype, seed=0).save_pretrained(model_dir)
    if not (model_dir / "tokenizer_config.json").exists():  # FastLanguageModel loads the tokenizer from there
        tokenizer.save_pretrained(model_dir)
    if config.loader == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=args.max_length, dtype=dtype,
                                                     load_in_4bit=config.quant == "nf4",
                                                     full_finetuning=config.adapter is None)
        if config.adapter == "lora":
            model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                                     target_modules=LORA_TARGETS,
                                                     use_gradient_checkpointing="unsloth", random_state=0)
        return model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # on the GPU every transformers row loads the saved weights in bf16, as a user's script does (the same
    # values as the seeded build cast to bf16); the nf4 rows quantise them while loading
    quantization = None
    if config.quant == "nf4":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=dtype,
                                                device_map={"": torch.cuda.current_device()},
                                                attn_implementation="sdpa")


def build_trainer(args, config: Config):
    """The configuration's ``SFTTrainer``: its model, the benchmark's data, the user's SFTConfig."""
    if config.loader == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers/trl)
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device == "cuda":  # a distributed launch: this rank's GPU, before the model is built
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = f"cuda:{torch.cuda.current_device()}"
    data = pathlib.Path(args.data)
    rows, real_tokens = load_rows(data, args.min_tokens)
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    torch.manual_seed(0)
    model = _load_model(config, args, _model_config(args.model, len(tokenizer)), tokenizer, device)

    values = dict(output_dir=str(pathlib.Path(args.out).parent / f"ckpt-{args.config}"),
                  per_device_train_batch_size=args.batch_size, num_train_epochs=1, max_length=args.max_length,
                  bf16=device.startswith("cuda"), learning_rate=2e-4 if config.adapter else 2e-5, logging_steps=1,
                  report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    if device == "cpu":
        values["use_cpu"] = True
    values.update(config.overrides)
    peft_config = None
    if config.adapter == "lora" and config.loader != "unsloth":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                 task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=SFTConfig(**values), train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer._benchmark_dataset_tokens = real_tokens
    return trainer


def run_one(args) -> dict:
    config = CONFIGS[args.config]
    if config.patched:
        import unsloth_patch  # noqa: F401  (the one line a user adds)
    elif os.environ.get("UNSLOTH_PATCH_DISABLE") != "1":
        raise SystemExit("run peers with UNSLOTH_PATCH_DISABLE=1 (the `all` command does)")
    built_at = time.perf_counter()
    trainer = build_trainer(args, config)
    build_s = time.perf_counter() - built_at  # model, dataset, SFTTrainer(...): before train()'s clock
    import torch
    import transformers
    import trl

    from metrics import RunMeter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    real_tokens = trainer._benchmark_dataset_tokens
    meter = RunMeter(trainer)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    output = meter.train()
    times = meter.times(output)
    peak = _whole_run_peak(config) / 2**30 if on_gpu else None
    if world > 1:  # throughput of the whole launch: every rank's tokens; memory: the fullest GPU
        times, peak = _across_ranks(times, peak)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "config": args.config, "model": args.model + args.tag, "notes": config.notes, "phase": args.phase,
        "batch_size": args.batch_size, "params": sum(p.numel() for p in trainer.model.parameters()),
        "real_tokens": times.tokens, "dataset_tokens": real_tokens, **times.as_dict(),
        "peak_gib": peak, "build_s": build_s, "world_size": world, "wrapper": type(trainer.model_wrapped).__name__,
        "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)), "launch": os.environ.get("SFT_BENCH_LAUNCH") or None,
        "losses": losses, "final_loss": losses[-1] if losses else None, "diagnostics": meter.diagnostics(),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "gradient_accumulation_steps": int(trainer.args.gradient_accumulation_steps), "optim": str(trainer.args.optim),
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
        "env": {k: v for k, v in os.environ.items() if k.startswith("UNSLOTH_PATCH_")},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "cuda": torch.version.cuda},
        "card": (f"{world}x " if world > 1 else "") + (torch.cuda.get_device_name(0) if on_gpu else "cpu"),
        "date": time.strftime("%Y-%m-%d"),
    }
    if config.patched:
        import dataclasses

        import unsloth_patch
        from unsloth_patch import checkpointing

        plan = unsloth_patch.last_plan()
        result["plan"] = plan.as_dict() if plan else None
        decision = checkpointing.last_decision()
        result["checkpointing"] = dataclasses.asdict(decision) if decision is not None else None
        result["predicted_peak_gib"] = _predicted_peaks(decision)
        startup_report = getattr(unsloth_patch, "startup_report", None)  # absent from builds before it existed
        result["startup"] = startup_report() if startup_report else None
        result["package"] = os.path.dirname(unsloth_patch.__file__)
    return result


def _predicted_peaks(decision) -> Optional[dict]:
    """The plugin's predicted peaks (GiB) where its probe measured the chosen policy: for the worst batch the data
    could make (what the policy was chosen by), and for the batches this run drew (its largest one's training step,
    or the probe's own largest step if that held more: both are inside the measured whole-run peak)."""
    if decision is None or not getattr(decision, "peaks", None) or decision.peaks.get(decision.policy) is None:
        return None
    worst = (decision.peaks[decision.policy] + decision.extra_bytes) / 2**30
    seen = getattr(decision, "predicted_seen_bytes", None)
    drawn = max(seen, decision.probe_peak_bytes or 0) / 2**30 if seen is not None else None
    return {"worst_batch": worst, "drawn_batches": drawn, "drawn_sequences": getattr(decision, "seen_sequences", None)}


def _whole_run_peak(config: Config) -> int:
    """Peak allocated over the whole train(): the plugin's probe resets the allocator's peak counter
    for each of its small steps, so its own peak (recorded in its decision) is taken into account."""
    import torch

    peak = torch.cuda.max_memory_allocated()
    if config.patched:
        from unsloth_patch import checkpointing

        decision = checkpointing.last_decision()
        if decision is not None and getattr(decision, "probe_peak_bytes", None):
            peak = max(peak, decision.probe_peak_bytes)
    return peak


def _across_ranks(times, peak):
    """Sum the ranks' tokens (each rank trains its share of every step) and take the largest peak."""
    import dataclasses

    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tokens = torch.tensor([times.tokens, times.steady_tokens], dtype=torch.float64, device=device)
    dist.all_reduce(tokens)
    top = torch.tensor([peak or 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    times = dataclasses.replace(times, tokens=int(tokens[0].item()), steady_tokens=int(tokens[1].item()))
    return times, (top.item() if peak is not None else None)


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _launcher(args) -> list:
    """``accelerate launch`` with the docs' config file, FSDP2 wrapping this model's decoder layers."""
    if not args.launch:
        return [sys.executable]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "docs" / "accelerate" / f"{args.launch}.yaml"), "--num_processes", str(args.nproc)]
    if args.launch == "fsdp2":
        command += ["--fsdp_transformer_layer_cls_to_wrap", DECODER_LAYERS[args.model]]
    return command


# ----------------------------------------------------------------------------------- driver

def _phases(args) -> list:
    return ["cold", "warm"] if args.warm else ["cold"]


def configurations(names: str) -> list:
    """The configurations named in a comma-separated list; exits naming the unknown ones and the known."""
    chosen = names.split(",")
    unknown = [n for n in chosen if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    return chosen


def run_all(args) -> None:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = configurations(args.configs)
    peaks: dict = {}
    caches: dict = {}  # name -> its cold row's cache directories (cold runs first, and a skipped cold skips warm)
    runs = [(rep, name, phase) for rep in range(args.repeat) for name in names for phase in _phases(args)]
    for rep, name, phase in runs:  # interleaved: every configuration's repeat r before any r + 1
        config = CONFIGS[name]
        suffix = f"-r{rep + args.first_repeat}" if args.repeat > 1 or args.first_repeat > 1 else ""
        target = out / f"{args.model}{args.tag}-{name}-{phase}{suffix}.json"
        cmd = [*_launcher(args), __file__, "run", "--config", name, "--model", args.model, "--data", args.data,
               "--out", str(target), "--min-tokens", str(args.min_tokens), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--model-dir", args.model_dir, f"--tag={args.tag}",
               "--phase", phase]
        print(f"== {name} ({phase})", flush=True)
        started = time.time()
        env = dict(os.environ)
        if not config.patched:  # importing unsloth_patch.tiny must not activate the plugin for peers
            env["UNSLOTH_PATCH_DISABLE"] = "1"
        if config.loader == "unsloth" and args.peer_path:
            env["PYTHONPATH"] = os.pathsep.join([args.peer_path, str(ROOT), str(HERE)])
        elif config.patched and args.patch_path:  # another build of the plugin, ahead of this checkout's
            env["PYTHONPATH"] = os.pathsep.join(p for p in [args.patch_path, env.get("PYTHONPATH", ""), str(ROOT),
                                                            str(HERE)] if p)
        else:
            env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), str(ROOT), str(HERE)] if p)
        env.update(config.env)
        if args.launch:
            env["SFT_BENCH_LAUNCH"] = f"{args.launch}x{args.nproc}"
        if config.match:
            if config.match not in peaks:
                print(f"   skipped: needs {config.match}'s peak from earlier in this call", flush=True)
                continue
            env["UNSLOTH_PATCH_MEMORY_BUDGET_GB"] = f"{peaks[config.match]:.3f}"
        # cold: empty compilation caches, as a user's first run; warm: a new process with the caches of the cold run
        if phase == "cold":
            caches[name] = _fresh_caches(name)
        env.update(caches[name])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            (out / f"{target.stem}.log").write_text(proc.stdout[-20000:] + "\n" + proc.stderr[-20000:])
            print(f"   FAILED ({proc.returncode}) after {time.time() - started:.0f}s:\n{proc.stderr[-2500:]}")
            target.write_text(json.dumps({"config": name, "model": args.model + args.tag, "phase": phase,
                                          "error": proc.stderr[-4000:]}))
            continue
        r = json.loads(target.read_text())
        if r.get("peak_gib") is not None:
            peaks.setdefault(name, r["peak_gib"])
        policy = (r.get("checkpointing") or {}).get("policy")
        predicted = r.get("predicted_peak_gib") or {}
        if predicted.get("drawn_batches") is not None:
            policy = f"{policy}, predicted peak {predicted['drawn_batches']:.2f} GiB (drawn batches), " \
                     f"{predicted['worst_batch']:.2f} GiB (worst batch)"
        print(f"   whole (wall-clock) {r['tokens_per_s_whole']:.0f} tok/s, steady {r['tokens_per_s_steady'] or 0:.0f} "
              f"(steps only {r.get('tokens_per_s_steady_steps') or 0:.0f}), "
              f"train_runtime-based {r['tokens_per_s_train_runtime']:.0f}, start-up {r['startup_s']:.1f}s, "
              f"peak {r['peak_gib'] or 0:.1f} GiB{', policy ' + policy if policy else ''}, "
              f"final loss {r['final_loss']:.4f}, {time.time() - started:.0f}s", flush=True)
    print(report(out, None, None))


# Every on-disk compilation cache a configuration's process can fill: Triton's kernels (ours, TRL's fused LM head,
# Inductor's), torch.compile's FX/AOTAutograd/autotune caches, and Unsloth's persisted torch.compile artifacts
# ("mega cache", on by default, in the home directory). Shared between processes, a cold row would start from the
# caches an earlier row of the same call filled: on 2026-12-07 a second Unsloth full-FT process ran 17.8k tokens/s
# whole-run where the first ran 7.0k.
CACHE_DIRS = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "UNSLOTH_MEGA_CACHE_DIR")


def _fresh_caches(name: str) -> dict:
    """An empty directory for each cache in ``CACHE_DIRS``."""
    return {var: tempfile.mkdtemp(prefix=f"{var.split('_')[0].lower()}-{name}-") for var in CACHE_DIRS}


def report(results: pathlib.Path, markdown, png) -> str:
    """Tables per model: cold and warm whole-run (wall-clock), steady, peak; ratios within one call."""
    repeats: dict = {}
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        if "config" not in r:  # another script's output kept beside the runs (e.g. a kernel check)
            continue
        r = _normalized(r)
        phase = r.get("phase", "cold")
        repeats.setdefault(r["model"], {}).setdefault(r["config"], {}).setdefault(phase, []).append(r)
    runs = {model: {name: {phase: _median_run(rs) for phase, rs in phases.items()} for name, phases in by.items()}
            for model, by in repeats.items()}
    lines = []
    for model, by_name in runs.items():
        cold = {k: v["cold"] for k, v in by_name.items() if "cold" in v and "error" not in v["cold"]}
        stocks = {k: cold.get(k) for k in ("stock", "stock_lora", "stock_qlora")}
        best_peers = {}  # per fine-tuning kind (full, LoRA, QLoRA): the fastest peer in steady state
        for k, v in cold.items():
            if k in PEERS:
                best = best_peers.get(_kind(k))
                if best is None or (v["tokens_per_s_steady"] or 0) > (best["tokens_per_s_steady"] or 0):
                    best_peers[_kind(k)] = v
        # the header's parameter count: a full-precision, adapter-free row (QLoRA packs 4-bit weights)
        some = cold.get("stock") or next((v for k, v in cold.items() if CONFIGS[k].quant is None
                                          and CONFIGS[k].adapter is None), next(iter(cold.values()), None))
        if some:
            date = f"{some['date']}, " if some.get("date") else ""
            lines.append(f"### {model} ({some['params'] / 1e9:.2f}B parameters) — {some['card']}, "
                         f"{date}torch {some['versions']['torch']}, transformers "
                         f"{some['versions']['transformers']}, TRL {some['versions']['trl']}\n")
        lines.append("| configuration | whole-run tok/s, cold | whole-run tok/s, warm | steady tok/s | whole / steady | "
                     "x stock (cold) | x stock (steady) | "  # against the matching stock row
                     "x best peer of its kind (steady) | "
                     "tok/s at the median steady step (x best peer) | "
                     "start-up s | build s | tok/s by train_runtime | peak GiB | predicted peak GiB (drawn / worst batch) | "
                     "final loss | max rel. loss diff vs stock |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name in CONFIGS:
            phases = by_name.get(name)
            if phases is None or "cold" not in phases:
                continue
            r = phases["cold"]
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'].strip().splitlines()[-1][:120]} |||||||||||||||")
                continue
            warm = phases.get("warm")
            warm_text = f"{warm['tokens_per_s_whole']:,.0f}" if warm and "error" not in warm else ""
            whole, steady = r["tokens_per_s_whole"], r["tokens_per_s_steady"] or 0
            diff = ""
            stock = stocks[matching_stock(name)]
            if stock and r["losses"] and "packing" not in name and (CONFIGS[name].loader != "unsloth"
                                                                     or name == "unsloth"):
                pairs = list(zip(stock["losses"], r["losses"]))
                diff = f"{max(abs(a - b) / abs(a) for a, b in pairs):.2%}" if pairs else ""
            label = f"{name} (median of {r['runs']})" if r.get("runs", 1) > 1 else name
            stock_steady = stock and stock["tokens_per_s_steady"]
            vs_stock = (f"{whole / stock['tokens_per_s_whole']:.2f}x | "
                        f"{f'{steady / stock_steady:.2f}x' if stock_steady and steady else ''}" if stock else " | ")
            best_peer = best_peers.get(_kind(name))
            vs_peer = (f"{steady / best_peer['tokens_per_s_steady']:.2f}x ({best_peer['config']})"
                       if best_peer and best_peer is not r and best_peer["tokens_per_s_steady"] and steady else "")
            ratio = f"{whole / steady:.2f}" if steady else ""
            at_median = _median_step_rate(r)
            peer_median = _median_step_rate(best_peer) if best_peer and best_peer is not r else None
            median_text = (f"{at_median:,.0f}" + (f" ({at_median / peer_median:.2f}x)" if peer_median else "")
                           if at_median else "")
            build = "" if r.get("build_s") is None else f"{r['build_s']:.1f}"
            predicted = r.get("predicted_peak_gib") or {}
            drawn = predicted.get("drawn_batches")
            prediction = (f"{drawn:.2f} / " if drawn is not None else "") + (
                f"{predicted['worst_batch']:.2f}" if predicted.get("worst_batch") is not None else "")
            peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else ""
            startup = "" if r.get("startup_s") is None else f"{r['startup_s']:.1f}"
            lines.append(f"| {label} | {whole:,.0f} | {warm_text} | {steady:,.0f} | {ratio} | {vs_stock} | {vs_peer} | "
                         f"{median_text} | {startup} | {build} | {r['tokens_per_s_train_runtime']:,.0f} | {peak} | {prediction} | "
                         f"{r['final_loss']:.4f} | {diff} |")
        lines.append("")
    text = "\n".join(lines)
    if markdown:
        pathlib.Path(markdown).write_text(text + "\n")
    if png:
        _plot({m: {n: p["cold"] for n, p in by.items() if "cold" in p} for m, by in runs.items()}, png)
    return text


def _median_step_rate(r: dict):
    """``metrics.tokens_per_s_median_step`` of a result, from its per-step diagnostics (None without them)."""
    from metrics import tokens_per_s_median_step

    return tokens_per_s_median_step((r.get("diagnostics") or {}).get("step_s"), r.get("steady_tokens") or 0)


def _kind(name: str) -> tuple:
    config = CONFIGS[name]
    return config.adapter, config.quant


def matching_stock(name: str) -> str:
    """The stock TRL row a configuration is compared with: the same fine-tuning kind (full, LoRA, QLoRA)."""
    config = CONFIGS[name]
    if config.quant == "nf4":
        return "stock_qlora"
    return "stock_lora" if config.adapter == "lora" else "stock"


def _normalized(r: dict) -> dict:
    """Older results in today's terms. Before 2026-12-01 "whole" was the train_runtime-based figure: recomputed
    by wall-clock. Before 2026-12-07 "steady" divided by the steady steps' own durations: that figure is kept as
    ``tokens_per_s_steady_steps`` and steady is recomputed over the steady window's wall-clock (steps and the
    gaps between them) where the per-step diagnostics allow, else marked unavailable (None)."""
    if "error" in r:
        return r
    r = dict(r)
    if "tokens_per_s_train_runtime" not in r:
        r["tokens_per_s_train_runtime"] = r["tokens_per_s_whole"]
        r["tokens_per_s_whole"] = r["real_tokens"] / r["wall_s"]
        r["startup_s"] = None
    if "tokens_per_s_steady_steps" not in r:
        r["tokens_per_s_steady_steps"] = r.get("tokens_per_s_steady")
        diagnostics = r.get("diagnostics") or {}
        steps, gaps = diagnostics.get("step_s"), diagnostics.get("between_steps_s")
        from metrics import first_steady_step

        skip = first_steady_step(len(steps or ()))
        if steps and gaps is not None and len(gaps) == len(steps) - 1 and len(steps) > skip and r.get("steady_tokens"):
            r["tokens_per_s_steady"] = r["steady_tokens"] / (sum(steps[skip:]) + sum(gaps[skip:]))
        else:
            r["tokens_per_s_steady"] = None
    return r


def _median_run(results: list) -> dict:
    """One result per configuration: the median run by whole-run throughput, with medians and ranges."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    ok.sort(key=lambda r: r["tokens_per_s_whole"])
    chosen = dict(ok[len(ok) // 2])
    for key in ("tokens_per_s_whole", "tokens_per_s_steady"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if not values:
            continue
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
        steady = [(r["tokens_per_s_steady"] or 0) / 1e3 for _, r in ok]
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
    parser.add_argument("--model", choices=list(MODELS), default="llama")
    parser.add_argument("--model-dir", default=str(HERE / "out" / "models"))
    parser.add_argument("--min-tokens", type=int, default=500_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="run every configuration N times, interleaved; "
                        "the report takes medians")
    parser.add_argument("--tag", default="", help="suffix for result files (e.g. b32 for a batch-size sweep)")
    parser.add_argument("--warm", action="store_true", help="after each cold run (empty Triton cache), run the "
                        "configuration again in a new process with the cache the cold run filled")
    parser.add_argument("--phase", default="cold", choices=["cold", "warm"], help=argparse.SUPPRESS)
    parser.add_argument("--peer-path", default="", help="PYTHONPATH for the Unsloth configurations (their own "
                        "site directory with TRL <= 1.15), when they run in the same call as the others")
    parser.add_argument("--first-repeat", type=int, default=1, help="number of the first repeat (result files "
                        "-rN): calls that interleave by hand (e.g. two builds) add repeats to one median")
    parser.add_argument("--patch-path", default="", help="PYTHONPATH ahead of this checkout for the unsloth_patch "
                        "configurations: a directory holding another build's unsloth_patch package (e.g. `git "
                        "archive` of an earlier commit), to compare builds in one call (give it its own --tag)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--results", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--png", default=None)
    parser.add_argument("--launch", choices=LAUNCHES, default=None, help="`all`: run each configuration under "
                        "`accelerate launch --config_file docs/accelerate/<launch>.yaml` (docs/distributed.md)")
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of a --launch run")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(pathlib.Path(args.out), args.vocab_size, args.max_length, args.limit)
    elif args.command == "run":
        result = run_one(args)
        if _is_main_rank():  # one file per launch
            pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    elif args.command == "all":
        run_all(args)
    else:
        print(report(pathlib.Path(args.results or args.out), args.markdown, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
