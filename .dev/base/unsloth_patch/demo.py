"""``python -m unsloth_patch demo``: the same TRL script, stock and with ``import unsloth_patch``.

A tiny model (built from a config, random weights) is fine-tuned on the shipped chat
sample twice, each run in a fresh Python process so the stock run cannot be touched by
the plugin. The training script is an ordinary TRL ``SFTTrainer`` script that never
mentions the plugin; for the patched run a small launcher executes ``import unsloth_patch``
before running the very same file. The launcher then reads the finished trainer's logs to
report tokens/s (real, non-pad tokens), peak memory and the loss curve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time

# Environment variable the launcher reads ("stock" or "patched"); the core plugin knows the
# name and does not treat it as a toggle.
CHILD_ENV = "UNSLOTH_PATCH_DEMO_CHILD"

# The user's script. {placeholders} are filled with the demo's settings; both runs use the
# identical file.
USER_SCRIPT = '''\
"""Fine-tune a small causal LM on a chat dataset with TRL's SFTTrainer.

An ordinary TRL script: nothing here refers to unsloth_patch.
"""
import torch
import trl
from datasets import load_dataset
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

MAX_LENGTH = {max_length}

model = AutoModelForCausalLM.from_pretrained("./model", attn_implementation="sdpa")
tok = AutoTokenizer.from_pretrained("./model")
ds = load_dataset("json", data_files="chat.jsonl", split="train")  # {{"messages": [...]}} per line

on_gpu = torch.cuda.is_available()
# The only branches are on the TRL version: TRL < 0.16 calls the length limit
# `max_seq_length` (later `max_length`); TRL < 0.15 spots chat datasets by an exact
# feature schema that datasets >= 4 no longer produces, so there the chat template is
# applied up front (as those versions would do themselves); TRL < 0.12 takes
# `tokenizer=` instead of `processing_class=`.
TRL = Version(trl.__version__)
extra = {{"max_seq_length": MAX_LENGTH}} if TRL < Version("0.16") else {{"max_length": MAX_LENGTH}}
if TRL < Version("0.15"):
    ds = ds.map(lambda ex: {{"text": tok.apply_chat_template(ex["messages"], tokenize=False)}}, remove_columns=["messages"])
    extra["dataset_text_field"] = "text"

args = SFTConfig(
    output_dir="out",  # inside the demo's working directory, removed with it
    per_device_train_batch_size={batch_size},
    num_train_epochs=1,
    learning_rate={learning_rate},
    lr_scheduler_type="constant",
    warmup_steps=0,
    logging_steps={logging_steps},
    save_strategy="no",
    report_to="none",
    gradient_checkpointing=False,
    bf16=on_gpu and torch.cuda.is_bf16_supported(),
    use_cpu=not on_gpu,
    seed=0,
    **extra,
)
if TRL >= Version("0.12"):
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
else:
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, tokenizer=tok)
trainer.train()
'''

# Runs in each child: optionally activates the plugin, runs the user script unchanged, and
# writes what it measured to result.json.
LAUNCHER = r'''
import importlib.util, json, os, resource, runpy, sys, traceback

mode = os.environ["UNSLOTH_PATCH_DEMO_CHILD"]
plugin = {"requested": mode == "patched", "active": False, "message": "", "applied": []}
if mode == "patched":
    if importlib.util.find_spec("unsloth_patch") is None:
        plugin["message"] = "unsloth_patch is not importable"
    else:
        try:
            import unsloth_patch
            plugin["active"] = True
        except Exception as exc:
            plugin["message"] = "import unsloth_patch failed: %s: %s" % (type(exc).__name__, exc)
            traceback.print_exc()

script_globals = runpy.run_path("train.py", run_name="__main__")
trainer = script_globals["trainer"]

if plugin["active"]:
    try:
        plugin["applied"] = [r.name for r in unsloth_patch.report() if r.applied]
        plan = unsloth_patch.last_plan()
        plugin["plan"] = plan.padding_free_reason if plan is not None else ""
    except Exception as exc:
        plugin["message"] = "report() failed: %s" % exc

import torch
args = trainer.args
limit = getattr(args, "max_length", None) or getattr(args, "max_seq_length", None)
data = trainer.train_dataset
tokens = None
if data is not None and "input_ids" in data.column_names:
    tokens = sum(min(len(ids), limit or len(ids)) for ids in data["input_ids"])
history = trainer.state.log_history
runtime = next((e["train_runtime"] for e in history if "train_runtime" in e), None)
if torch.cuda.is_available():
    memory = {"kind": "gpu", "bytes": torch.cuda.max_memory_allocated(), "device": torch.cuda.get_device_name(0)}
else:
    memory = {"kind": "cpu_max_rss", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
result = {
    "mode": mode,
    "plugin": plugin,
    "tokens": tokens,
    "train_runtime": runtime,
    "tokens_per_s": tokens / runtime if tokens and runtime else None,
    "steps": trainer.state.global_step,
    "losses": [[e["step"], e["loss"]] for e in history if "loss" in e],
    "train_loss": next((e["train_loss"] for e in history if "train_loss" in e), None),
    "memory": memory,
}
with open("result_%s.json" % mode, "w") as f:
    json.dump(result, f)
'''

# Builds the model, tokenizer and data once, in a process where the plugin is disabled, so
# both runs start from identical files.
PREPARE = r'''
import json, sys
from unsloth_patch import tiny
from unsloth_patch.data import load_chat_sample

out, n, family, hidden, layers = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
tok = tiny.build_tokenizer()
heads = max(2, hidden // 32)
model = tiny.build_model(
    family, vocab_size=len(tok), hidden_size=hidden, num_layers=layers, num_heads=heads,
    num_kv_heads=max(1, heads // 2), intermediate_size=hidden * 2, max_position_embeddings=1024,
)
model.save_pretrained(out + "/model")
tok.save_pretrained(out + "/model")
with open(out + "/chat.jsonl", "w", encoding="utf-8") as f:
    for row in load_chat_sample(n):
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
print(sum(p.numel() for p in model.parameters()))
'''


def _package_root() -> str:
    """Directory holding the ``unsloth_patch`` package, so children can import it uninstalled."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env(**extra: str) -> dict:
    env = dict(os.environ)
    root = _package_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.pop(CHILD_ENV, None)
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: str, env: dict, log_path: str) -> int:
    with open(log_path, "w") as log:
        return subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _print_run(label: str, r: dict, out) -> None:
    p = r["plugin"]
    print(f"\n[{label}]", file=out)
    if p["requested"]:
        if p["active"]:
            applied = ", ".join(p["applied"]) or "none yet"
            print(f"  plugin: imported; patches applied: {applied}", file=out)
        else:
            print(f"  plugin: NOT ACTIVE ({p['message']}); this run is effectively stock", file=out)
        if p["active"] and p.get("plan"):
            print(f"  padding-free: {p['plan']}", file=out)
        if p["active"] and p["message"]:
            print(f"  plugin note: {p['message']}", file=out)
    tps = r["tokens_per_s"]
    print(f"  steps: {r['steps']}   tokens: {r['tokens']}   train time: {r['train_runtime']:.2f} s", file=out)
    print(f"  tokens/s: {tps:,.0f}" if tps else "  tokens/s: n/a", file=out)
    mem = r["memory"]
    if mem["kind"] == "gpu":
        print(f"  peak memory: {_fmt_bytes(mem['bytes'])} (GPU, torch max allocated, {mem['device']})", file=out)
    else:
        print(f"  peak memory: {_fmt_bytes(mem['bytes'])} (no GPU: CPU max RSS of the process)", file=out)
    losses = "  ".join(f"{s}:{loss:.4f}" for s, loss in r["losses"])
    print(f"  loss per logged step: {losses}", file=out)
    final = r["losses"][-1][1] if r["losses"] else None
    print(f"  final loss: {final:.4f}" if final is not None else "  final loss: n/a", file=out)


def main(argv: list[str] | None = None) -> int:
    """Run the stock and the patched fine-tune and print both sets of numbers. Returns an exit code."""
    parser = argparse.ArgumentParser(prog="python -m unsloth_patch demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps (one epoch over steps*batch conversations)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--family", default="llama", help="model family from unsloth_patch.tiny (default llama)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--workdir", help="keep the script, model and logs here instead of a temp dir")
    parser.add_argument("--quiet-script", action="store_true", help="print the script's path, not its text")
    args = parser.parse_args(argv)
    out = sys.stdout

    from .data import load_chat_sample

    available = len(load_chat_sample())
    n = min(args.steps * args.batch_size, available)
    steps = math.ceil(n / args.batch_size)
    logging_steps = max(1, steps // 5)

    tmp = None
    if args.workdir:
        work = os.path.abspath(args.workdir)
        os.makedirs(work, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="unsloth_patch_demo_")
        work = tmp.name
    try:
        t0 = time.time()
        script = USER_SCRIPT.format(
            max_length=args.max_length,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            logging_steps=logging_steps,
        )
        script_path = os.path.join(work, "train.py")
        with open(script_path, "w") as f:
            f.write(script)
        with open(os.path.join(work, "launch.py"), "w") as f:
            f.write(LAUNCHER)

        print(f"unsloth_patch demo: {n} real conversations (chitchat-dataset sample), {steps} steps, "
              f"batch {args.batch_size}, max length {args.max_length}", file=out)
        rc = _run(
            [sys.executable, "-c", PREPARE, work, str(n), args.family, str(args.hidden_size), str(args.num_layers)],
            work,
            _child_env(UNSLOTH_PATCH_DISABLE="1"),
            os.path.join(work, "prepare.log"),
        )
        if rc != 0:
            print("preparing the tiny model failed:\n" + _tail(os.path.join(work, "prepare.log")), file=out)
            return 1
        params = _tail(os.path.join(work, "prepare.log"), 1).strip()
        print(f"model: tiny {args.family} from a config, random weights ({params} parameters), "
              f"hidden {args.hidden_size}, {args.num_layers} layers", file=out)
        if args.quiet_script:
            print(f"training script (identical for both runs): {script_path}", file=out)
        else:
            print(f"\ntraining script {script_path} (identical for both runs):", file=out)
            print(textwrap.indent(script, "    | ", lambda line: True), file=out)
        print("stock run:   python train.py", file=out)
        print("patched run: the same train.py, with `import unsloth_patch` executed first", file=out)

        results = {}
        for mode in ("stock", "patched"):
            print(f"running {mode} ...", file=out, flush=True)
            log_path = os.path.join(work, f"{mode}.log")
            rc = _run([sys.executable, "launch.py"], work, _child_env(**{CHILD_ENV: mode}), log_path)
            result_path = os.path.join(work, f"result_{mode}.json")
            if rc != 0 or not os.path.exists(result_path):
                print(f"the {mode} run failed (exit code {rc}); last lines of its log:\n{_tail(log_path)}", file=out)
                return 1
            with open(result_path) as f:
                results[mode] = json.load(f)

        for mode in ("stock", "patched"):
            _print_run(mode, results[mode], out)

        s, p = results["stock"], results["patched"]
        print("\ncomparison:", file=out)
        if s["tokens_per_s"] and p["tokens_per_s"]:
            speed = p["tokens_per_s"] / s["tokens_per_s"]
            mem = p["memory"]["bytes"] / s["memory"]["bytes"] if s["memory"]["bytes"] else float("nan")
            fs = s["losses"][-1][1] if s["losses"] else float("nan")
            fp = p["losses"][-1][1] if p["losses"] else float("nan")
            print(f"  patched vs stock: {speed:.2f}x tokens/s, {mem:.2f}x peak memory, "
                  f"final loss {fp:.4f} vs {fs:.4f} (diff {fp - fs:+.4f})", file=out)
        if not p["plugin"]["active"]:
            print("  note: the plugin did not activate in the patched run, so both runs are stock.", file=out)
        if p["memory"]["kind"] != "gpu":
            print("  note: CPU only: the plugin keeps stock's padded batches here (no varlen kernel beats them on a "
                  "CPU) and its GPU kernels do not run, so both runs should train alike; timings are noisy.", file=out)
        print(f"  total demo time: {time.time() - t0:.1f} s", file=out)
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
