"""Kernel compilation moved off the first step: which variants a model's config asks for, and that
launching them on a few rows works (here in the Triton interpreter; on a GPU it compiles them)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from unsloth_patch import warmup
from unsloth_patch.settings import Settings
from unsloth_patch.tiny import build_model

from .helpers import needs_trl, sft_config, sft_trainer, text_dataset


def test_specs_follow_the_models_config():
    from unsloth_patch.kernels import warmup as kw

    llama = build_model("llama", hidden_size=128, num_heads=2, num_kv_heads=1).config  # head dim 64
    specs = warmup.specs_for(llama, torch.bfloat16, torch.bfloat16, Settings())
    assert kw.AttentionSpec(2, 1, 64, torch.bfloat16, None, None) in specs
    assert kw.NormSpec(128, torch.bfloat16, torch.bfloat16, 0.0) in specs
    assert kw.GatedSpec(torch.bfloat16, gelu=False) in specs
    assert kw.RopeSpec(2, 1, 64, torch.bfloat16, torch.bfloat16) in specs
    fp32_params = warmup.specs_for(llama, torch.bfloat16, torch.float32, Settings(kernels_off=("rmsnorm", "swiglu")))
    assert [s for s in fp32_params if not isinstance(s, kw.AttentionSpec)] == [
        kw.RopeSpec(2, 1, 64, torch.bfloat16, torch.float32)]  # bf16 q/k under autocast, fp32 tables
    assert not [s for s in warmup.specs_for(llama, torch.bfloat16, torch.bfloat16, Settings(kernels_off=("rope",)))
                if isinstance(s, kw.RopeSpec)]
    gemma2 = build_model("gemma2", hidden_size=128, num_heads=2, num_kv_heads=1, sliding_window=16).config
    specs = warmup.specs_for(gemma2, torch.bfloat16, torch.float32, Settings())
    softcap = gemma2.attn_logit_softcapping
    assert {s.window for s in specs if isinstance(s, kw.AttentionSpec)} == {None, 16}
    assert all(s.softcap == softcap for s in specs if isinstance(s, kw.AttentionSpec))
    assert kw.NormSpec(128, torch.float32, torch.float32, 1.0) in specs and kw.GatedSpec(torch.bfloat16, True) in specs
    assert not [s for s in warmup.specs_for(llama, torch.bfloat16, torch.bfloat16, Settings(kernels="off",
                                                                                           attention="off"))]
    tiny_heads = build_model("llama").config  # head dim 16: no kernel for it
    assert not [s for s in warmup.specs_for(tiny_heads, torch.float32, torch.float32, Settings())
                if isinstance(s, kw.AttentionSpec)]


def test_nothing_starts_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert warmup.start(build_model("llama"), None, Settings()) is False and not warmup.pending()


@pytest.mark.kernels
def test_every_variant_launches(monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from unsloth_patch.kernels import warmup as kw

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    specs = [kw.AttentionSpec(4, 2, 64, dtype), kw.AttentionSpec(4, 2, 64, dtype, window=8, softcap=30.0),
             kw.NormSpec(96, dtype, dtype), kw.NormSpec(64, dtype, dtype, 1.0), kw.NormSpec(640, dtype, dtype),
             kw.GatedSpec(dtype), kw.GatedSpec(dtype, gelu=True), kw.RopeSpec(4, 2, 64, dtype, dtype),
             kw.RopeSpec(6, 1, 80, dtype, torch.float32)]
    streams = torch.random.get_rng_state(), (torch.cuda.get_rng_state() if device == "cuda" else None)
    assert kw.warm_up(specs, device) == []
    assert os.environ.get("TRITON_INTERPRET") == "1" or device == "cuda"
    assert torch.equal(torch.random.get_rng_state(), streams[0])  # the user's random streams are not drawn from
    assert device != "cuda" or torch.equal(torch.cuda.get_rng_state(), streams[1])


def test_launches_run_on_threads_and_failures_are_reported_once_per_spec(monkeypatch):
    import threading

    from unsloth_patch.kernels import warmup as kw

    ran, threads = [], set()

    def launch(name, fail=False):
        def run(spec, device):
            ran.append((spec, name))
            threads.add(threading.current_thread().name)
            if fail:
                raise RuntimeError(f"{name} failed")
        return run

    monkeypatch.setattr(kw, "_interpreting", lambda: False)
    monkeypatch.setattr(kw, "_LAUNCHES", {kw.NormSpec: (launch("forward"), launch("backward", fail=True)),
                                          kw.GatedSpec: (launch("gated"),)})
    norm, gated = kw.NormSpec(64, torch.float32, torch.float32), kw.GatedSpec(torch.float32)
    failed = kw.warm_up([norm, gated], "cpu")
    assert sorted(ran, key=str) == sorted([(norm, "forward"), (norm, "backward"), (gated, "gated")], key=str)
    assert failed == [(norm, "RuntimeError: backward failed")]
    assert all(name.startswith("unsloth_patch-compile") for name in threads)
    ran.clear()
    kw.warm_up([norm, gated], "cpu", parallel=False)
    assert [name for _, name in ran] == ["forward", "backward", "gated"]


@needs_trl("1.15", "fused LM head")
def test_trls_fused_head_kernels_are_launched_as_trl_calls_them(monkeypatch, tmp_path, tokenizer):
    """While our warm-up runs, SFTTrainer's add_fused_lm_head also hands TRL's chunked log-prob function to
    it: the launch calls TRL's function with the model's vocabulary, TRL's chunk size and the outputs TRL
    asked for, forward and backward, and leaves the model and its gradients alone."""
    from trl import SFTTrainer  # noqa: F401  (a script that trains with it: TRL's head is warmed as the model is built)
    from trl.trainer import utils as trl_utils

    from unsloth_patch.patches import fused_head_warmup

    started = []
    monkeypatch.setattr(warmup, "start_task",
                        lambda name, launch, key=None: started.append((name, launch, key)) or True)
    model = build_model("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert [name for name, _, _ in started] == ["TRL fused LM head"]  # begun as the model was built
    sft_trainer(model, tokenizer, text_dataset(tokenizer, limit=8), sft_config(tmp_path, max_length=64))
    assert [name for name, _, _ in started] == ["TRL fused LM head"] * 2
    assert started[0][2] == started[1][2], "the early start guessed SFTTrainer's call: the same kernels"
    started = started[1:]

    calls = []
    original = trl_utils._ChunkedLogProbFunction.apply

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    stream = torch.random.get_rng_state()
    started[0][1](torch.device("cpu"), torch.float32)
    assert torch.equal(torch.random.get_rng_state(), stream)  # made-up inputs from a generator of their own
    (hidden, weight, bias, targets, temperature, chunk_size, softcap, scale, outputs), = calls
    assert weight.shape[0] == model.get_output_embeddings().weight.shape[0] and bias is None
    assert chunk_size == trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE and temperature == 1.0
    assert set(outputs) >= {"log_probs", "entropy"}  # what SFTTrainer asks its head for
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()  # the backward ran
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert fused_head_warmup.TOKENS == hidden.shape[0]


def test_extra_tasks_start_once_a_warm_up_of_ours_was_begun_and_are_waited_for(monkeypatch):
    import threading

    monkeypatch.setattr(warmup, "_tasks", [])
    monkeypatch.setattr(warmup, "_threads", [])
    monkeypatch.setattr(warmup, "_started", {})
    assert warmup.start_task("no warm-up of ours begun", lambda device, dtype: None) is False
    release, ran = threading.Event(), []
    ours = threading.Thread(target=release.wait, daemon=True)
    ours.start()
    monkeypatch.setattr(warmup, "_threads", [ours])
    monkeypatch.setitem(warmup._started, "device", torch.device("cpu"))
    monkeypatch.setitem(warmup._started, "compute_dtype", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    def slow(device, dtype):
        release.wait()
        ran.append((device, dtype))

    assert warmup.start_task("slow", slow) is True
    assert warmup.start_task("broken", lambda device, dtype: 1 / 0) is True
    assert warmup.pending()
    release.set()
    outcome = warmup.wait(timeout=30)
    assert ran == [(torch.device("cpu"), torch.bfloat16)] and not warmup.pending()
    assert outcome["tasks"]["slow"]["error"] is None
    assert outcome["tasks"]["broken"]["error"].startswith("ZeroDivisionError")
    ours.join(timeout=30)  # ours done (its kernels compiled before TRL built its head): still begun
    assert warmup.start_task("after ours", lambda device, dtype: ran.append("after")) is True
    warmup.wait(timeout=30)
    assert ran[-1] == "after"


def _pretend_a_gpu(monkeypatch):
    """``warmup.start`` as on a GPU with Triton, its compile threads recording what they were given."""
    import sys
    import types

    begun = []
    monkeypatch.setattr(warmup, "_threads", [])
    monkeypatch.setattr(warmup, "_begun", set())
    monkeypatch.setattr(warmup, "_started", {})
    monkeypatch.setattr(warmup, "_outcome", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setitem(sys.modules, "unsloth_patch.kernels._triton", types.SimpleNamespace(triton=object()))
    monkeypatch.setattr(warmup, "_run", lambda specs, device: begun.append(list(specs)))
    return begun


def test_a_half_precision_model_is_warmed_when_built_and_the_trainer_adds_only_what_is_new(monkeypatch):
    from types import SimpleNamespace

    from unsloth_patch.kernels import warmup as kw

    begun = _pretend_a_gpu(monkeypatch)
    config = dict(hidden_size=128, num_heads=2, num_kv_heads=1)
    assert warmup.start(build_model("llama", dtype=torch.float32, **config), None, Settings()) is False
    assert not begun, "a float32 model's compute dtype is the trainer's to say"
    bf16 = build_model("llama", dtype=torch.bfloat16, **config)
    assert warmup.start(bf16, None, Settings(), where="at model construction") is True
    assert warmup.wait(timeout=30)["begun"] == "at model construction"  # what train() reports
    specs = begun[-1]
    assert kw.AttentionSpec(2, 1, 64, torch.bfloat16, None, None) in specs
    assert warmup._started["compute_dtype"] == torch.bfloat16
    # SFTTrainer(...) with bf16=True: every variant already begun, nothing compiles twice
    assert warmup.start(bf16, SimpleNamespace(bf16=True, fp16=False), Settings()) is False and len(begun) == 1
    # fp16 training of the same model: only the variants of the new compute dtype begin
    assert warmup.start(bf16, SimpleNamespace(bf16=False, fp16=True), Settings()) is True
    warmup.wait(timeout=30)
    added = begun[-1]
    assert added and all(spec not in specs for spec in added)
    assert kw.AttentionSpec(2, 1, 64, torch.float16, None, None) in added
    assert warmup._started["compute_dtype"] == torch.float16  # TRL's head warms in the trainer's dtype


def test_building_a_model_in_a_trl_script_begins_the_warm_up(monkeypatch):
    import trl  # noqa: F401  (the script imported TRL)

    from unsloth_patch import registry

    assert "model_warmup" in registry.applied_names()  # transformers >= 4.46: every CI pair
    calls = []
    monkeypatch.setattr(warmup, "start", lambda model, args, settings, where="": calls.append((model, args, where)))
    model = build_model("llama", dtype=torch.bfloat16)
    assert calls and calls[-1] == (model, None, "at model construction")
    assert all(args is None for _, args, _ in calls)


def test_a_task_with_a_key_begins_once_per_device_and_dtype(monkeypatch):
    ran = []
    monkeypatch.setattr(warmup, "_tasks", [])
    monkeypatch.setattr(warmup, "_begun", set())
    monkeypatch.setattr(warmup, "_started", {"device": torch.device("cpu"), "compute_dtype": torch.bfloat16})
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert warmup.start_task("head", lambda device, dtype: ran.append(dtype), key=("v", 1)) is True
    assert warmup.start_task("head", lambda device, dtype: ran.append(dtype), key=("v", 1)) is False
    assert warmup.start_task("head", lambda device, dtype: ran.append(dtype), key=("v", 2)) is True
    warmup._started["compute_dtype"] = torch.float16  # the trainer trains in fp16: compiled anew
    assert warmup.start_task("head", lambda device, dtype: ran.append(dtype), key=("v", 1)) is True
    assert warmup.start_task("head", lambda device, dtype: ran.append(dtype)) is True  # no key: always
    warmup.wait(timeout=30)
    assert sorted(map(str, ran)) == sorted(map(str, [torch.bfloat16, torch.bfloat16, torch.float16, torch.float16]))


def test_the_start_up_report_says_what_the_warm_up_did():
    from unsloth_patch import startup

    outcome = {"seconds": 2.5, "specs": 4, "failed": [],
               "tasks": {"TRL fused LM head": {"seconds": 0.75, "error": None}}}
    line = warmup.describe(outcome)
    assert line == "4 variants in 2.50 s on compile threads; TRL fused LM head 0.75 s"
    failing = warmup.describe({"seconds": 1.0, "specs": 2, "failed": [("spec", "boom")],
                               "tasks": {"TRL fused LM head": {"seconds": 0.5, "error": "RuntimeError: x"}}})
    assert failing == "2 variants in 1.00 s on compile threads; TRL fused LM head 0.50 s (failed); 1 failed"
    early = warmup.describe({"seconds": 3.0, "specs": 5, "failed": [], "begun": "at model construction"})
    assert early == "5 variants in 3.00 s on compile threads, begun at model construction"
    assert warmup.describe(None) == "none"
    startup.begin()
    with startup.phase("waiting for kernel compilation"):
        pass
    startup.note("kernel warm-up", line)
    summary = startup.train_started(0.0)
    assert summary["notes"] == {"kernel warm-up": line} and "waiting for kernel compilation" in summary["phases"]
    startup.begin()  # the next trainer starts without the previous one's notes
    assert "notes" not in startup.train_started(0.0)


def test_train_reports_a_warm_up_that_finished_before_it_was_called(monkeypatch):
    """A warm-up whose threads are done when ``train()`` starts costs no wait, but the report still says what it
    compiled (on the GPU, every LoRA and QLoRA row lost it once the warm-up began at model construction)."""
    import threading
    from types import SimpleNamespace

    from unsloth_patch import startup
    from unsloth_patch.patches import training_edits

    done = threading.Thread(target=lambda: None)
    done.start()
    done.join()
    monkeypatch.setattr(warmup, "_threads", [done])
    monkeypatch.setattr(warmup, "_tasks", [])
    monkeypatch.setattr(warmup, "_outcome", {"seconds": 1.75, "specs": 3, "failed": [], "begun": "at SFTTrainer()"})
    monkeypatch.setattr(training_edits, "_startup_callback", lambda called_at: object())
    assert not warmup.pending()
    trainer = SimpleNamespace(add_callback=lambda callback: None, remove_callback=lambda callback: None)
    startup.begin()
    assert training_edits.handle_train(lambda: "trained", trainer, (), {}) == "trained"
    summary = startup.train_started(0.0)
    assert summary["notes"] == {"kernel warm-up": "3 variants in 1.75 s on compile threads, begun at SFTTrainer()"}
    assert "waiting for kernel compilation" not in summary["phases"]
    startup.begin()  # a train() with no warm-up at all reports none
    assert training_edits.handle_train(lambda: "again", trainer, (), {}) == "again"
    assert "notes" not in startup.train_started(0.0)
