"""Longest context: the longest sequence that trains one step at batch 1 within a GPU memory budget.

Llama-3.1-8B-shaped QLoRA (random weights, fixed seed; nf4 base with double quantisation, LoRA r=16 on
every linear layer: ``sft.py``'s QLoRA configurations and loader) under 24 and 80 GiB, for stock TRL,
Unsloth and unsloth_patch. Each (budget, configuration) runs in a fresh process that caps the CUDA
allocator at the budget (``torch.cuda.set_per_process_memory_fraction``; unsloth_patch is also told it
through ``UNSLOTH_PATCH_MEMORY_BUDGET_GB``), loads and LoRA-wraps the model once, then tries lengths,
each with a fresh ``SFTTrainer`` as a user would build it (batch 1, ``max_length`` = the length, one
step, TRL's default checkpointing) on one example of exactly that many random token ids. Lengths
double from ``--start`` until a step runs out of memory (or ``--limit`` trains), then bisect down to
``--granularity``. ``--time-limit-s`` bounds each process's search (loading excluded): when it is
spent, the bracket found so far is reported as incomplete. Without CUDA no budget is applied (the
tiny model is the harness's own smoke test).

    python benchmarks/longest_context.py all --model llama8b --budgets 24,80 \\
        --configs stock_qlora,unsloth_qlora,unsloth_patch_qlora --out OUT [--peer-path P] [--model-dir D]
    python benchmarks/longest_context.py report --out OUT
    python benchmarks/longest_context.py all --model tiny --budgets 1 --configs stock_qlora \\
        --out /tmp/lc --start 64 --limit 256 --granularity 64            # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Optional

from sft import CONFIGS, LORA_TARGETS, _load_model, configurations  # stdlib-only at import: the plugin stays inactive here

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TRIAL_FIELDS = ("length", "ok", "seconds", "peak_bytes")


@dataclass
class Search:
    longest: Optional[int]  # longest length that trained (None: not even the granularity)
    first_failure: Optional[int]  # shortest length that ran out of memory (None: none did)
    complete: bool  # False: the time allowance ran out first
    trials: list  # (length, ok, seconds, peak_bytes) in the order tried


def longest(trial: Callable[[int], tuple], start: int = 4096, limit: int = 1_048_576, granularity: int = 1024,
            time_limit_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
            on_trial: Optional[Callable[[list], None]] = None) -> Search:
    """Double from ``start`` until ``trial(length) -> (ok, peak_bytes)`` fails or ``limit`` trains, then bisect
    between the last success and the first failure (from 0 when ``start`` fails) down to ``granularity``.
    The answer may lie anywhere from thousands to a million tokens: doubling brackets it in a few trials
    without first paying for steps far longer than it."""
    if granularity <= 0 or limit < granularity:
        raise ValueError(f"need 0 < granularity <= limit, got {granularity} and {limit}")
    limit -= limit % granularity
    start = min(max(start - start % granularity, granularity), limit)
    began, trials, good, bad, length = clock(), [], None, None, start
    while length is not None:
        if time_limit_s is not None and clock() - began >= time_limit_s:
            return Search(good, bad, False, trials)
        started = clock()
        ok, peak = trial(length)
        trials.append((length, bool(ok), clock() - started, peak))
        if on_trial:
            on_trial(trials)
        good, bad = (length, bad) if ok else (good, length)
        if bad is None:  # doubling
            length = min(2 * length, limit) if length < limit else None
        else:  # bisecting between the last success (0 when start failed) and the first failure
            low = good or 0
            length = low + (bad - low) // 2 // granularity * granularity if bad - low > granularity else None
    return Search(good, bad, True, trials)


# ----------------------------------------------------------------------------------- one configuration

def _model_config(name: str):
    from unsloth_patch.tiny import build_llama_1b_config

    shape = dict(max_position_embeddings=1_048_576, tie_word_embeddings=False)
    if name == "tiny":
        return build_llama_1b_config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, **shape)
    return build_llama_1b_config(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                                 **shape)  # Llama-3.1-8B's shape: 8.03B parameters


def _apply_budget(args, config, on_gpu: bool) -> Optional[int]:
    """Cap the allocator before anything touches CUDA memory (every configuration alike); tell unsloth_patch too.
    Returns the cap in bytes (the card's size when the budget is larger), None without a GPU."""
    if not on_gpu:
        return None
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    cap = min(int(args.budget_gb * 2**30), total)
    torch.cuda.set_per_process_memory_fraction(cap / total, 0)
    if config.patched:
        os.environ["UNSLOTH_PATCH_MEMORY_BUDGET_GB"] = f"{args.budget_gb:g}"
    return cap


def _load(config, args, device: str):
    """(model wrapped in LoRA once, tokenizer, quantisation used, why not nf4). On CPU, sft.py's nf4 loader runs
    with its device map pointed at the CPU; if bitsandbytes cannot load there, the model stays unquantised."""
    from types import SimpleNamespace
    from unittest import mock

    import torch

    from unsloth_patch.tiny import build_tokenizer

    tokenizer = build_tokenizer()  # only pads: the data are token ids already
    where = SimpleNamespace(model_dir=args.model_dir, model=args.model, max_length=args.limit)
    quant, note = config.quant, None
    try:
        with mock.patch.object(torch.cuda, "current_device", lambda: "cpu") if device == "cpu" else nullcontext():
            model = _load_model(config, where, _model_config(args.model), tokenizer, device)
    except Exception as exc:  # noqa: BLE001  (whatever bitsandbytes' CPU build raises)
        if device != "cpu" or not config.quant:
            raise
        quant, note = None, f"nf4 skipped on CPU: {type(exc).__name__}: {exc}"[:300]
        model = _load_model(replace(config, quant=None), where, _model_config(args.model), tokenizer, device)
    # wrapped once, as Unsloth's loader does: every trial's SFTTrainer gets this PeftModel (a peft_config would
    # stack a new adapter on each trial's model; TRL 1.16 treats both alike apart from get_peft_model)
    if config.adapter == "lora" and config.loader != "unsloth":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
    return model, tokenizer, quant, note


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def _probe_decision(config):
    """unsloth_patch's last checkpointing decision (it records its probe's peak), None for the peers."""
    if not config.patched:
        return None
    from unsloth_patch import checkpointing

    return checkpointing.last_decision()


def _trial(model, tokenizer, config, args, length: int, on_gpu: bool, leaks: list) -> tuple:
    """Train one step on ``length`` random tokens with a fresh SFTTrainer: (trained, peak allocated bytes)."""
    import weakref

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ids = torch.randint(6, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
    scratch = tempfile.TemporaryDirectory(prefix="longest-context-")  # save_strategy="no": stays empty
    values = dict(output_dir=scratch.name, per_device_train_batch_size=1, max_length=length, max_steps=1,
                  bf16=on_gpu, use_cpu=not on_gpu, learning_rate=2e-4, logging_steps=1, report_to="none",
                  save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    values.update(config.overrides)  # Unsloth's rows: sft.py's optimizer settings
    decision_before = _probe_decision(config)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer, ok = None, False
    try:
        trainer = SFTTrainer(model=model, args=SFTConfig(**values), processing_class=tokenizer,
                             train_dataset=Dataset.from_dict({"input_ids": [ids.tolist()]}))
        trained = len(trainer.train_dataset[0]["input_ids"])
        if trained != length:  # before training: a longer example could run out of memory and hide this
            raise ValueError(f"SFTTrainer made the {length}-token example {trained} tokens long")
        trainer.train()
        if trainer.state.global_step != 1:
            raise ValueError(f"{trainer.state.global_step} optimizer steps instead of one")
        ok = True
    except Exception as exc:  # noqa: BLE001
        if not _out_of_memory(exc):
            raise
    peak = None
    if on_gpu:
        peak = torch.cuda.max_memory_allocated()
        decision = _probe_decision(config)  # the plugin's probe resets the peak counter: its own peak counts
        if decision is not None and decision is not decision_before:
            peak = max(peak, getattr(decision, "probe_peak_bytes", 0) or 0)
    alive = weakref.ref(trainer) if trainer is not None else lambda: None
    del trainer
    model.zero_grad(set_to_none=True)
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    scratch.cleanup()
    if alive() is not None:  # something kept the trainer (and its optimizer state) past its trial
        leaks.append(length)
    return ok, peak


def run_one(args) -> dict:
    config = CONFIGS[args.config]
    import torch  # neither the plugin nor Unsloth minds torch first; both must precede transformers

    on_gpu = torch.cuda.is_available()
    cap = _apply_budget(args, config, on_gpu)
    if config.patched:
        import unsloth_patch  # noqa: F401  (the one line a user adds)
    elif os.environ.get("UNSLOTH_PATCH_DISABLE") != "1":
        raise SystemExit("run peers with UNSLOTH_PATCH_DISABLE=1 (the `all` command does)")
    if config.loader == "unsloth":
        import unsloth  # noqa: F401
    import transformers
    import trl

    loading = time.perf_counter()
    model, tokenizer, quant, note = _load(config, args, "cuda" if on_gpu else "cpu")
    result = {"config": args.config, "model": args.model, "budget_gb": args.budget_gb, "cap_bytes": cap,
              "card": torch.cuda.get_device_name(0) if on_gpu else "cpu", "date": time.strftime("%Y-%m-%d"),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__, "cuda": torch.version.cuda},
              "quant": quant, "quant_note": note, "notes": config.notes, "load_s": time.perf_counter() - loading,
              "model_bytes": torch.cuda.memory_allocated() if on_gpu else None,
              "search": {"start": args.start, "limit": args.limit, "granularity": args.granularity,
                         "time_limit_s": args.time_limit_s},
              "env": {k: v for k, v in os.environ.items() if k.startswith("UNSLOTH_PATCH_")}}
    leaks: list = []

    def record(trials, complete=False) -> None:
        """Written after every trial, so that a process killed later leaves its bracket behind (the search's
        bracket only narrows: it is the longest success and the shortest failure so far)."""
        result.update(longest=max((n for n, ok, _, _ in trials if ok), default=None),
                      first_failure=min((n for n, ok, _, _ in trials if not ok), default=None),
                      complete=complete, leaked_trainers=leaks, trials=[dict(zip(TRIAL_FIELDS, t)) for t in trials])
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))

    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    search = longest(lambda n: _trial(model, tokenizer, config, args, n, on_gpu, leaks), args.start, args.limit,
                     args.granularity, args.time_limit_s, on_trial=record)
    record(search.trials, search.complete)
    return result


# ----------------------------------------------------------------------------------- driver

def _result_path(out: pathlib.Path, model: str, name: str, budget: float) -> pathlib.Path:
    return out / f"longest-{model}-{name}-{budget:g}gb.json"


def _child_env(config, peer_path: str) -> dict:
    """As sft.py's driver: peers run with the plugin disabled; Unsloth from its own site directory."""
    env = dict(os.environ)
    if not config.patched:
        env["UNSLOTH_PATCH_DISABLE"] = "1"
    paths = [peer_path] if config.loader == "unsloth" and peer_path else [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*paths, str(ROOT), str(HERE)] if p)
    return {**env, **config.env}


def run_all(args) -> None:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = configurations(args.configs)
    for budget in [float(b) for b in args.budgets.split(",")]:
        for name in names:
            target = _result_path(out, args.model, name, budget)
            target.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "run", "--config", name, "--model", args.model, "--budget-gb",
                   f"{budget:g}", "--out", str(target), "--model-dir", args.model_dir, "--start", str(args.start),
                   "--limit", str(args.limit), "--granularity", str(args.granularity),
                   "--time-limit-s", str(args.time_limit_s)]
            print(f"== {name}, {budget:g} GiB", flush=True)
            started = time.time()
            try:  # loading (an 8B model is first written to --model-dir) and one overrunning trial on top
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_limit_s + 1800,
                                      env=_child_env(CONFIGS[name], args.peer_path))
                error = None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-4000:]}"
                logs = proc.stdout[-20000:] + "\n" + proc.stderr[-20000:]
            except subprocess.TimeoutExpired as exc:
                error, logs = f"timed out after {exc.timeout:.0f}s", str(exc.stderr or "")[-20000:]
            if error:  # keep the bracket the process recorded before it died
                target.with_suffix(".log").write_text(logs)
                partial = json.loads(target.read_text()) if target.exists() else {}
                target.write_text(json.dumps({"config": name, "model": args.model, "budget_gb": budget, **partial,
                                              "complete": False, "error": error}, indent=1))
                print(f"   FAILED after {time.time() - started:.0f}s: {error[-2500:]}", flush=True)
                continue
            r = json.loads(target.read_text())
            print(f"   longest {r['longest']}, first failure {r['first_failure']}, "
                  f"{'complete' if r['complete'] else 'incomplete'}, {len(r['trials'])} trials, "
                  f"{time.time() - started:.0f}s", flush=True)
    print(report(out))


def _cell(r: dict) -> str:
    """Longest trained length; "≥ ... (limit)" when nothing failed; an incomplete search says where it stopped."""
    if r.get("error") and not r.get("trials"):
        return "failed: " + r["error"].strip().splitlines()[-1][:80]
    text = f"{r['longest']:,}" if r.get("longest") else f"< {r['search']['granularity']:,}"
    if r.get("first_failure") is None and r.get("complete"):
        text = f"≥ {text} (limit)"
    if not r.get("complete"):
        why = "stopped by an error" if r.get("error") else "incomplete"
        text += f" ({why}; fails at {r['first_failure']:,})" if r.get("first_failure") else f" ({why})"
    return text


def report(out: pathlib.Path) -> str:
    """Markdown table per model: rows = configurations, columns = budgets, cells = longest trained tokens."""
    runs: dict = {}
    for path in sorted(out.glob("longest-*.json")):
        r = json.loads(path.read_text())
        runs.setdefault(r["model"], {})[(r["config"], r["budget_gb"])] = r
    lines = []
    for model, by in runs.items():
        budgets = sorted({b for _, b in by})
        some = next((r for r in by.values() if "versions" in r), None)
        if some:
            lines.append(f"### {model}, batch 1, one step, quantisation {some.get('quant') or 'none'} — "
                         f"{some['card']}, {some['date']}, torch {some['versions']['torch']}, transformers "
                         f"{some['versions']['transformers']}, TRL {some['versions']['trl']}\n")
        lines.append("| configuration | " + " | ".join(f"{b:g} GiB" for b in budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for name in [n for n in CONFIGS if any(c == n for c, _ in by)]:  # sft.py's order
            cells = [_cell(by[(name, b)]) if (name, b) in by else "" for b in budgets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "all", "report"])
    parser.add_argument("--model", choices=["llama8b", "tiny"], default="llama8b")
    parser.add_argument("--config", choices=list(CONFIGS), help="`run`: the configuration of this process")
    parser.add_argument("--configs", default="stock_qlora,unsloth_qlora,unsloth_patch_qlora")
    parser.add_argument("--budget-gb", type=float, default=24.0, help="`run`: GiB the process may allocate")
    parser.add_argument("--budgets", default="24,80", help="`all`: comma-separated GiB budgets")
    parser.add_argument("--out", default=str(HERE / "out" / "longest"),
                        help="`all`/`report`: the results folder; `run`: its result file")
    parser.add_argument("--model-dir", default=str(HERE / "out" / "models-longest"))
    parser.add_argument("--peer-path", default="", help="PYTHONPATH for the Unsloth configuration (its own site "
                        "directory with TRL <= 1.15), as in sft.py")
    parser.add_argument("--start", type=int, default=4096)
    parser.add_argument("--limit", type=int, default=1_048_576)
    parser.add_argument("--granularity", type=int, default=1024)
    parser.add_argument("--time-limit-s", type=float, default=240.0, help="each process's search allowance")
    args = parser.parse_args(argv)
    if args.command == "run":
        if not args.config:
            parser.error("run needs --config")
        run_one(args)
    elif args.command == "all":
        run_all(args)
    else:
        print(report(pathlib.Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
