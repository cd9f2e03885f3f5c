"""``benchmarks/longest_context.py``: the length search finds the exact threshold in the expected trials, and the
harness trains real one-step trials (a simulated out-of-memory counts as a failure, not a crash)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.append(str(BENCHMARKS))  # after the installed packages: its module names stay out of their way
import longest_context as lc  # noqa: E402


def _threshold(max_ok: int):
    """A fake trial that trains any length up to ``max_ok`` and records what it was asked."""
    asked = []

    def trial(length):
        asked.append(length)
        return length <= max_ok, None

    return trial, asked


def test_doubles_then_bisects_to_the_threshold_rounded_down_to_the_granularity():
    trial, asked = _threshold(37_000)
    found = lc.longest(trial)  # start 4096, limit 1_048_576, granularity 1024
    assert asked == [4096, 8192, 16384, 32768, 65536, 49152, 40960, 36864, 38912, 37888]
    assert (found.longest, found.first_failure, found.complete) == (36864, 37888, True)
    assert [(length, ok) for length, ok, _, _ in found.trials] == [(n, n <= 37_000) for n in asked]


@pytest.mark.parametrize("granularity", [64, 1000, 1024])
def test_every_threshold_is_found_exactly(granularity):
    for max_ok in range(granularity, 300_000, 4_999):
        trial, asked = _threshold(max_ok)
        found = lc.longest(trial, start=4096, limit=1_048_576, granularity=granularity)
        assert found.longest == max_ok // granularity * granularity, max_ok
        assert found.first_failure == found.longest + granularity and found.complete
        assert all(n % granularity == 0 for n in asked) and len(asked) == len(set(asked))


def test_a_failing_start_bisects_downwards():
    trial, asked = _threshold(2500)
    found = lc.longest(trial)
    assert asked == [4096, 2048, 3072]
    assert (found.longest, found.first_failure, found.complete) == (2048, 3072, True)
    trial, asked = _threshold(500)  # not even the granularity trains
    found = lc.longest(trial)
    assert asked == [4096, 2048, 1024]
    assert (found.longest, found.first_failure, found.complete) == (None, 1024, True)


def test_the_limit_is_tried_last_and_never_passed():
    trial, asked = _threshold(10**9)
    found = lc.longest(trial, limit=20_000)  # rounded down to the granularity
    assert asked == [4096, 8192, 16384, 19456]
    assert (found.longest, found.first_failure, found.complete) == (19456, None, True)
    trial, asked = _threshold(10**9)
    assert lc.longest(trial).longest == max(asked) == 1_048_576
    trial, asked = _threshold(10**9)
    assert lc.longest(trial, start=8192, limit=4096).longest == 4096 and asked == [4096]  # start above the limit


def test_a_spent_time_allowance_returns_the_bracket_so_far_as_incomplete():
    now = [0.0]

    def slow(max_ok):
        trial, asked = _threshold(max_ok)

        def timed(length):
            now[0] += 100.0
            return trial(length)

        return timed, asked

    trial, asked = slow(37_000)  # each trial takes 100 s: three fit before 250 s are spent
    found = lc.longest(trial, time_limit_s=250, clock=lambda: now[0])
    assert asked == [4096, 8192, 16384]
    assert (found.longest, found.first_failure, found.complete) == (16384, None, False)
    assert [seconds for _, _, seconds, _ in found.trials] == [100.0] * 3
    now[0] = 0.0
    trial, asked = slow(37_000)  # stopped inside the bisection: a bracket with both ends
    found = lc.longest(trial, time_limit_s=550, clock=lambda: now[0])
    assert asked == [4096, 8192, 16384, 32768, 65536, 49152]
    assert (found.longest, found.first_failure, found.complete) == (32768, 49152, False)


def test_the_report_has_a_row_per_configuration_and_a_column_per_budget(tmp_path):
    def write(config, budget, **fields):
        result = {"config": config, "model": "llama8b", "budget_gb": budget, "card": "H100", "date": "2026-12-07",
                  "quant": "nf4", "versions": {"torch": "t", "transformers": "x", "trl": "r"},
                  "search": {"granularity": 1024}, "trials": [], **fields}
        lc._result_path(tmp_path, "llama8b", config, budget).write_text(json.dumps(result))

    write("stock_qlora", 24.0, longest=9216, first_failure=10240, complete=True)
    write("stock_qlora", 80.0, longest=32768, first_failure=49152, complete=False)
    write("unsloth_patch_qlora", 24.0, longest=1_048_576, first_failure=None, complete=True)
    write("unsloth_patch_qlora", 80.0, error="exit 1: ImportError: no unsloth", complete=False)
    table = lc.report(tmp_path)
    assert "| configuration | 24 GiB | 80 GiB |" in table
    assert "| stock_qlora | 9,216 | 32,768 (incomplete; fails at 49,152) |" in table
    assert "| unsloth_patch_qlora | ≥ 1,048,576 (limit) | failed: exit 1: ImportError: no unsloth |" in table
    assert table.index("stock_qlora |") < table.index("unsloth_patch_qlora |")  # sft.py's order


@pytest.mark.newest_only  # the benchmark speaks today's TRL (max_length, processing_class, token-id datasets)
def test_a_real_trial_trains_one_step_and_an_out_of_memory_step_is_a_failure(tmp_path):
    """Real SFTTrainers on one shared LoRA model; lengths past 200 raise CUDA's out-of-memory error mid-forward."""
    import types

    import torch
    from peft import LoraConfig, get_peft_model

    from unsloth_patch.tiny import build_model, build_tokenizer

    model = get_peft_model(build_model("llama", vocab_size=512, seed=0),
                           LoraConfig(r=4, target_modules=lc.LORA_TARGETS, task_type="CAUSAL_LM"))

    def out_of_memory_past_200(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 200:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    hook = model.get_base_model().model.layers[1].register_forward_pre_hook(out_of_memory_past_200, with_kwargs=True)
    args = types.SimpleNamespace(out=str(tmp_path / "r.json"), config="stock_lora")
    lora_b = model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
    leaks = []
    try:
        found = lc.longest(lambda n: lc._trial(model, build_tokenizer(), lc.CONFIGS["stock_lora"], args, n, False,
                                               leaks), start=64, limit=1024, granularity=32)
    finally:
        hook.remove()
    assert [(n, ok) for n, ok, _, _ in found.trials] == [(64, True), (128, True), (256, False), (192, True),
                                                         (224, False)]
    assert (found.longest, found.first_failure, found.complete) == (192, 224, True)
    assert lora_b.abs().sum() > 0  # the successful steps trained the adapter (LoRA B starts at zero)
    assert leaks == [] and all(p.grad is None for p in model.parameters())  # nothing held between trials


def test_out_of_memory_is_told_from_other_errors():
    import torch

    assert lc._out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert lc._out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not lc._out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lc._out_of_memory(ValueError("out of memory"))


@pytest.mark.newest_only  # a fresh process per configuration; the harness does not depend on the TRL version
def test_the_cpu_run_searches_the_tiny_qlora_model_in_a_fresh_process(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "longest_context.py"), "all", "--model", "tiny",
                           "--budgets", "1", "--configs", "stock_qlora", "--out", str(out), "--model-dir",
                           str(tmp_path / "models"), "--start", "64", "--limit", "256", "--granularity", "64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "longest-tiny-stock_qlora-1gb.json").read_text())
    assert "error" not in result, result.get("error")
    assert (result["longest"], result["first_failure"], result["complete"]) == (256, None, True)
    assert [(t["length"], t["ok"]) for t in result["trials"]] == [(64, True), (128, True), (256, True)]
    assert result["quant"] in ("nf4", None) and (result["quant"] is not None or result["quant_note"])
    assert result["card"] == "cpu" and result["cap_bytes"] is None and result["leaked_trainers"] == []
    assert result["versions"]["trl"] and result["config"] == "stock_qlora"
    assert "| stock_qlora | ≥ 256 (limit) |" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["longest-tiny-stock_qlora-1gb.json"]  # no trainer litter
