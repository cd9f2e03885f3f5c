"""The benchmark's whole-run figure is wall-clock of ``trainer.train()``: our probe is in it.

(``train_runtime``, transformers' own clock, starts after the probe: a figure divided by it hides
the plugin's start-up. The benchmark keeps it as an extra column only.)
"""

from __future__ import annotations

import pathlib
import sys
import time

import pytest

import unsloth_patch
from unsloth_patch import checkpointing as policy
from unsloth_patch.patches import checkpointing as wiring
from unsloth_patch.tiny import build_model, build_tokenizer

from .helpers import sft_config, sft_trainer, text_dataset, use_settings  # noqa: F401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from metrics import RunMeter  # noqa: E402

SLOW = 2.5  # seconds the injected probe sleeps (well above the run-to-run noise of a contended CI core)


def _measured(tokenizer, dataset, tmp_path):
    trainer = sft_trainer(build_model("llama", vocab_size=len(tokenizer), seed=0), tokenizer, dataset,
                          sft_config(tmp_path, max_length=48, max_steps=4, logging_steps=1))
    meter = RunMeter(trainer)
    return meter.times(meter.train())


def test_a_slow_probe_lowers_the_whole_run_figure_but_not_train_runtimes(tmp_path, use_settings, monkeypatch):
    tokenizer = build_tokenizer()
    dataset = text_dataset(tokenizer, limit=16)
    use_settings(memory_budget_gb=8.0)  # the probe runs on this CPU
    monkeypatch.setattr(wiring, "explicit_reason", lambda args: None)
    monkeypatch.setattr(wiring, "checkpointing_on", lambda args: True)
    _measured(tokenizer, dataset, tmp_path / "first")  # one-time costs (lazy imports, first probe) land here
    fast = _measured(tokenizer, dataset, tmp_path / "fast")
    real = policy.measure

    def slow_measure(*args, **kwargs):
        time.sleep(SLOW)
        return real(*args, **kwargs)

    monkeypatch.setattr(policy, "measure", slow_measure)
    slow = _measured(tokenizer, dataset, tmp_path / "slow")
    assert slow.tokens == fast.tokens > 0 and slow.steps == fast.steps == 4
    assert slow.wall_s >= fast.wall_s + 0.8 * SLOW  # the probe is inside the whole-run time
    assert slow.tokens_per_s_whole < fast.tokens_per_s_whole
    assert slow.startup_s >= SLOW and slow.wall_s - slow.train_runtime_s >= 0.8 * SLOW  # train_runtime misses it
    started = unsloth_patch.startup_report()
    assert started["phases"]["checkpointing probe"] >= SLOW and started["ours_s"] >= SLOW
    assert started["to_first_step_s"] >= started["ours_s"]


@pytest.mark.newest_only  # four fresh processes; the harness does not depend on the TRL version
def test_the_benchmark_runs_cold_and_warm_and_reports_wall_clock(tmp_path):
    import json
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "sft.py"
    data, out = tmp_path / "data", tmp_path / "out"
    common = ["--max-length", "128"]
    done = subprocess.run([sys.executable, str(script), "prepare", "--out", str(data), "--limit", "60",
                           "--vocab-size", "512", *common], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, str(script), "all", "--data", str(data), "--out", str(out), "--model", "tiny",
                           "--configs", "stock,unsloth_patch", "--warm", "--min-tokens", "3000", "--batch-size", "4",
                           "--model-dir", str(tmp_path / "models"), *common],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(results) == {"tiny-stock-cold", "tiny-stock-warm", "tiny-unsloth_patch-cold", "tiny-unsloth_patch-warm"}
    for r in results.values():
        assert "error" not in r, r.get("error")
        assert abs(r["tokens_per_s_whole"] - r["real_tokens"] / r["wall_s"]) <= 1e-6 * r["tokens_per_s_whole"]
        assert r["wall_s"] >= r["train_runtime_s"] and r["steps"] > 1
    assert results["tiny-unsloth_patch-cold"]["startup"]["ours_s"] >= 0
    assert "whole-run tok/s, cold | whole-run tok/s, warm" in done.stdout
    profile = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, str(script.parent / "profile_step.py"), "--config", "unsloth_patch",
                           "--model", "tiny", "--data", str(data), "--out", str(profile), "--warmup", "1",
                           "--steps", "2", "--min-tokens", "3000", "--batch-size", "4", "--model-dir",
                           str(tmp_path / "models"), *common], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    measured = json.loads(profile.read_text())
    assert measured["by_class_ms"]["matmul"] > 0 and measured["step_ms"] > 0 and measured["launches_per_step"] > 0
    assert "| kernel class (ms per step) | unsloth_patch |" in done.stdout


def test_steady_state_is_wall_clock_over_the_steady_steps_with_the_gaps_between_them():
    """Steady throughput counts the host work between steps (next batch, logging): tokens of the steps after the
    first 10% over the time from the first of them starting to the last one ending, not the steps' own sum."""
    from types import SimpleNamespace

    meter = object.__new__(RunMeter)
    clock, meter.step_times = 100.0, []
    for step in range(20):  # 20 steps of 0.05 s with 0.01 s between them; the first two (10%) slower
        duration = 0.5 if step < 2 else 0.05
        meter.step_times.append([clock, clock + duration])
        clock += duration + 0.01
    meter.micro_tokens = [1000 + step for step in range(20)]
    meter.trainer = SimpleNamespace(args=SimpleNamespace(gradient_accumulation_steps=1))
    meter.start, meter.wall_s = 99.0, clock - 99.0
    times = meter.times(SimpleNamespace(metrics={"train_runtime": 1.0}))
    steady_tokens = sum(meter.micro_tokens[2:])
    assert times.steady_tokens == steady_tokens and times.steps == 20
    assert times.steady_s == pytest.approx(18 * 0.05 + 17 * 0.01)
    assert times.steady_steps_s == pytest.approx(18 * 0.05)
    assert times.tokens_per_s_steady == pytest.approx(steady_tokens / (18 * 0.05 + 17 * 0.01))
    assert times.tokens_per_s_steady_steps > times.tokens_per_s_steady
    assert times.first_steps_s == pytest.approx(1.0) and times.startup_s == pytest.approx(1.0)


def test_older_results_get_the_wall_clock_steady_figure_from_their_per_step_record():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import sft

    steps, gaps = [0.5] + [0.1] * 9, [0.02] * 9
    old = {"config": "stock", "real_tokens": 1000, "wall_s": 2.0, "tokens_per_s_whole": 500.0,
           "tokens_per_s_train_runtime": 600.0, "steady_tokens": 900, "tokens_per_s_steady": 1000.0,
           "diagnostics": {"step_s": steps, "between_steps_s": gaps}}
    new = sft._normalized(old)
    assert new["tokens_per_s_steady_steps"] == 1000.0
    assert new["tokens_per_s_steady"] == pytest.approx(900 / (9 * 0.1 + 8 * 0.02))
    assert sft._normalized({**old, "diagnostics": {}})["tokens_per_s_steady"] is None  # no record: not guessed


def test_the_median_step_figure_leaves_out_a_few_long_steps_that_the_steady_figure_keeps():
    """A peer that recompiles in a few steady steps: its steady figure (wall-clock) pays for them, the
    median-step figure shows the pace of its typical step; both are reported, side by side."""
    from metrics import first_steady_step, tokens_per_s_median_step

    steps = [3.0] + [0.1] * 18 + [2.0]  # a compiling first step, one stall in the steady window
    skip = first_steady_step(len(steps))
    steady_tokens = 1000 * (len(steps) - skip)
    steady_rate = steady_tokens / sum(steps[skip:])
    at_median = tokens_per_s_median_step(steps, steady_tokens)
    assert at_median == pytest.approx(1000 / 0.1)
    assert steady_rate < at_median / 1.5  # the stall costs the wall-clock figure a third of its rate
    assert tokens_per_s_median_step([0.2, 0.1, 0.3], 2000) == pytest.approx(1000 / 0.2)  # even count: the mean of two
    assert tokens_per_s_median_step([], 1000) is None and tokens_per_s_median_step([0.1, 0.1], 0) is None
