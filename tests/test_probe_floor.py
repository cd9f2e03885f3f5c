"""The checkpointing probe's own memory: no step predicted over the budget is run, what the probe
allocates is freed, and a budget that fits every candidate chooses as before.

The ladder's rules on made-up steps first (pure, instant), then the probe on a tiny model through
``Trainer.train`` (CPU: live tensor bytes; the budget from UNSLOTH_PATCH_MEMORY_BUDGET_GB, set
through the settings object), and the CUDA cap with the allocator's functions stood in for.
"""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import unsloth_patch  # noqa: E402  (activates the patches before TRL/transformers load)
from unsloth_patch import checkpointing as policy  # noqa: E402
from unsloth_patch.attention import dispatch  # noqa: E402
from unsloth_patch.checkpointing import meter  # noqa: E402
from unsloth_patch.checkpointing import probe as probe_module  # noqa: E402
from unsloth_patch.patches import checkpointing as wiring  # noqa: E402
from unsloth_patch.settings import current  # noqa: E402
from unsloth_patch.tiny import build_model  # noqa: E402

from .helpers import config_fields, sft_config, sft_trainer, text_dataset, use_settings  # noqa: E402,F401

unsloth_patch.apply()
GIB = policy.GIB
SLACK = 4096  # live-byte peaks can differ by a few bytes between probes (small scalars)


# --------------------------------------------------------------------------- the ladder's rules, on made-up steps

LAYERS, WEIGHTS, GRADS = 4, 1000, 400
ACTIVATIONS = 100  # one layer's, per sequence
KEPT = {"none": LAYERS * ACTIVATIONS, "selective": LAYERS * ACTIVATIONS // 2, "mlp_recompute": 5 * LAYERS, "offload": 0,
        "full": 5 * LAYERS}
RISE = {"none": 0, "mlp_recompute": ACTIVATIONS // 4}  # a recomputed layer's own rise, per sequence (default: all)


NO_MLP_RECOMPUTE = tuple(name for name in policy.POLICIES if name != "mlp_recompute")  # a model without fused MLPs


def made_up_step(name, sequences):
    """A step shaped like a decoder's: a forward holding what the policy keeps, then one backward phase per layer
    (a recomputation of the layer under checkpointing) allocating that layer's gradients."""
    held = WEIGHTS + KEPT[name] * sequences
    phases, starts, kinds = [(held + 10 * sequences, 0)], [WEIGHTS], ["forward"]
    for layer in range(LAYERS):
        grads = GRADS * layer // LAYERS
        start = held + grads
        rise = RISE.get(name, ACTIVATIONS) * sequences
        phases.append((start + rise + GRADS // LAYERS, grads))
        starts.append(start)
        kinds.append("recompute" if name != "none" else "backward")
    return policy.Step(sequences, WEIGHTS, tuple(phases), tuple(starts), tuple(kinds), GRADS)


def ladder_for(sequences, budget, extra=0, run=None):
    ran = []

    def measure(name, batch):
        ran.append((name, len(batch.lengths)))
        return (run or made_up_step)(name, len(batch.lengths))

    released = []
    ladder = policy.Ladder(policy.ProbeBatch([64] * sequences, flat=True), measure, budget, extra,
                           floor=WEIGHTS + GRADS, release=lambda: released.append(True))
    return ladder, ran, released


def test_a_step_predicted_over_the_budget_is_never_run():
    """The budget fits full checkpointing's batch (and offload's, and mlp_recompute's), not no checkpointing's
    smallest step: neither ``none`` nor ``selective`` runs a single step, and no step that ran was predicted or held
    over the budget."""
    extra = 50
    budget = made_up_step("full", 2).peak + extra
    assert made_up_step("none", 1).peak + extra > budget  # the shape of the issue: none's smallest step is over
    for candidates, first_fit in ((policy.POLICIES, "mlp_recompute"), (NO_MLP_RECOMPUTE, "offload")):
        ladder, ran, _ = ladder_for(2, budget, extra)
        rejected = {}
        chosen, peaks = policy.choose(candidates, ladder.peak, budget, extra, rejected=rejected)
        assert chosen == first_fit
        assert peaks == {"none": None, "selective": None, first_fit: made_up_step(first_fit, 2).peak}
        assert ran[0] == ("full", 1)  # full checkpointing's smallest step first: the least any candidate holds
        assert {name for name, _ in ran} == {"full", first_fit}
        for name in ("none", "selective"):
            assert "predicted" in rejected[name] and "not run" in rejected[name], rejected
        for record in ladder.records:
            assert record["predicted"] <= budget and record["peak"] <= budget, record


def test_steps_climb_one_two_four_and_extrapolate_to_the_batch():
    ladder, ran, _ = ladder_for(8, budget=10 ** 9)
    assert policy.step_sizes(8) == (1, 2, 4) and policy.step_sizes(3) == (1, 2, 3) and policy.step_sizes(1) == (1,)
    assert ladder.peak("full") == made_up_step("full", 8).peak  # linear per phase: exact
    assert ran == [("full", 1), ("full", 2), ("full", 4)]
    assert ladder.peak("none") == made_up_step("none", 8).peak
    # full's steps predict none's 2-sequence step to fit, so its 1-sequence step would only have guarded it
    assert ran[3:] == [("none", 2), ("none", 4)]
    none_two = next(r for r in ladder.records if r["candidate"] == "none" and r["sequences"] == 2)
    assert none_two["predicted"] >= none_two["peak"]  # every layer's activations on top of full's: errs high
    assert ladder.predict("selective", 2)[0] == none_two["peak"]  # it keeps a part of what none keeps


def test_a_step_that_runs_out_of_memory_rejects_its_candidate_and_is_released():
    def run(name, sequences):
        if name == "none":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")
        return made_up_step(name, sequences)

    ladder, ran, released = ladder_for(2, budget=10 ** 9, run=run)
    rejected = {}
    assert policy.choose(policy.POLICIES, ladder.peak, 10 ** 9, rejected=rejected)[0] == "selective"
    assert rejected == {"none": "its 2-sequence probe step ran out of memory (OutOfMemoryError: CUDA out of memory. "
                                "Tried to allocate 2.00 GiB)"}
    assert released == [True]
    assert [r["peak"] for r in ladder.records if r["candidate"] == "none"] == [None]


def test_when_full_does_not_fit_what_holds_more_is_rejected_unrun():
    budget = WEIGHTS + GRADS + 10  # the model and its gradients, hardly more
    ladder, ran, _ = ladder_for(4, budget)
    rejected = {}
    chosen, peaks = policy.choose(policy.POLICIES, ladder.peak, budget, rejected=rejected)
    assert chosen is None and peaks == dict.fromkeys(policy.POLICIES)
    assert "holds at least what full" in rejected["none"] and "holds at least what full" in rejected["selective"]
    assert {name for name, _ in ran} <= {"full", "mlp_recompute", "offload"}
    assert all(r["predicted"] <= budget for r in ladder.records)


def test_a_layer_keeping_candidate_far_over_the_budget_runs_no_step():
    """Full's steps predict none's whole batch; at half that prediction still over the budget, none (and selective,
    which keeps a part of it) is rejected before any step: its steps would hold more than the chosen policy needs."""
    probe, _, _ = ladder_for(8, budget=10 ** 9)
    probe._climb(policy.ladder.ANCHOR, upto=2)
    kept_batch, _ = probe.predict("none", 8)
    assert kept_batch >= made_up_step("none", 8).peak  # the prediction from full's steps errs high
    budget = kept_batch // 2 - 1
    assert made_up_step("none", 2).peak <= budget  # none's 2-sequence step would have fitted and run before
    ladder, ran, _ = ladder_for(8, budget)
    rejected = {}
    chosen, _ = policy.choose(policy.PREFERENCE, ladder.peak, budget, rejected=rejected)
    assert chosen == "mlp_recompute"
    assert {name for name, _ in ran} == {"full", "mlp_recompute"}
    assert "at 1/2 of that it is still over the budget" in rejected["none"] and "not run" in rejected["none"]
    assert max(r["peak"] for r in ladder.records) <= made_up_step("mlp_recompute", 8).peak  # no more than chosen's
    # with the budget at the prediction itself, none's steps run as before (and show it does not fit the batch)
    ladder, ran, _ = ladder_for(8, kept_batch // 2 + made_up_step("none", 8).peak // 4)
    policy.choose(policy.PREFERENCE, ladder.peak, ladder.budget)
    assert ("none", 2) in ran


def test_selective_is_tried_after_mlp_recompute_and_rejected_unrun_when_that_does_not_fit():
    assert policy.PREFERENCE == ("none", "mlp_recompute", "selective", "offload", "full")
    assert set(policy.PREFERENCE) == set(policy.POLICIES)
    # mlp_recompute's batch just over the budget: selective, which keeps more of every layer, runs no step
    budget = made_up_step("mlp_recompute", 4).peak - 1
    ladder, ran, _ = ladder_for(4, budget)
    rejected = {}
    chosen, _ = policy.choose(policy.PREFERENCE, ladder.peak, budget, rejected=rejected)
    assert chosen == ("offload" if made_up_step("offload", 4).peak <= budget else None)
    assert "over the budget" in rejected["mlp_recompute"]
    assert rejected["selective"].startswith("it holds at least what") and rejected["selective"].endswith("does not fit")
    assert "selective" not in {name for name, _ in ran}
    assert ladder._does_not_fit("mlp_recompute")  # from its measured steps, whatever full's small steps said
    # with room for both, mlp_recompute is chosen first and selective is not probed at all
    ladder, ran, _ = ladder_for(4, budget=10 ** 9)
    assert policy.choose(policy.PREFERENCE[1:], ladder.peak, 10 ** 9)[0] == "mlp_recompute"
    assert "selective" not in {name for name, _ in ran}


# --------------------------------------------------------------------------- the probe on a tiny model


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return text_dataset(tokenizer, limit=8)


def _trainer(tokenizer, dataset, tmp_path, batch=1, **overrides):
    """Checkpointing on only as TRL >= 0.24's default has it."""
    from trl import SFTConfig

    values = dict(max_length=32, per_device_train_batch_size=batch, max_steps=1)
    if "bf16" in config_fields(SFTConfig):
        values["bf16"] = False
    values.update(overrides)
    config = sft_config(tmp_path, **values)
    for name in wiring.FLAG_FIELDS:
        if hasattr(config, name):
            object.__setattr__(config, name, True)
    return sft_trainer(build_model("llama", vocab_size=len(tokenizer), seed=0), tokenizer, dataset, config)


def _need(trainer, name) -> int:
    """What ``name`` needs for the run's batch: its predicted peak plus the later extra."""
    spec = wiring.probe_spec(trainer)
    return policy.predicted_peak(trainer.model, spec, name, {}, None, None, loss_fn=wiring.trainer_loss(trainer)) \
        + wiring.extra_bytes(trainer)


def test_no_checkpointing_over_the_budget_is_never_run(tokenizer, dataset, tmp_path, use_settings):
    """The issue's case: a budget that only checkpointing fits. No step of no checkpointing runs (its smallest is
    predicted over the budget from full checkpointing's), and no step that ran was predicted or held over it."""
    trainer = _trainer(tokenizer, dataset, tmp_path, optim="sgd")  # no optimizer state: the budget is all the step's
    budget = _need(trainer, "full") + SLACK
    use_settings(memory_budget_gb=budget / GIB)
    trainer.train()
    decision = policy.last_decision()
    assert decision.policy in ("offload", "full"), decision.summary()
    for name in ("none", "selective"):
        assert "not run" in decision.rejected.get(name, "not run"), decision.rejected
    assert "none" in decision.rejected and f"none rejected: {decision.rejected['none']}" in decision.summary()
    assert not [r for r in decision.probe_steps if r["candidate"] in ("none", "selective")], decision.probe_steps
    budget_bytes = decision.budget_bytes
    for record in decision.probe_steps:
        assert record["predicted"] <= budget_bytes and (record["peak"] or 0) <= budget_bytes, record
    assert decision.probe_peak_bytes <= budget_bytes
    # each step's wall time is kept, so a start-up report can say where the probe's seconds went
    assert decision.probe_steps and all(0 < r["seconds"] < 600 for r in decision.probe_steps), decision.probe_steps
    # and split into preparing, the step itself and putting the model back: the parts lie inside the whole
    for record in decision.probe_steps:
        if record["peak"] is not None:
            parts = record["parts"]
            assert set(parts) == {"prepare", "step", "restore"} and min(parts.values()) >= 0, record
            assert parts["step"] > 0 and sum(parts.values()) <= record["seconds"] + 1e-3, record
    assert decision.as_dict()["probe_steps"] == decision.probe_steps


def test_the_probe_leaves_nothing_allocated(tokenizer, dataset, tmp_path, use_settings, monkeypatch):
    """After the whole probe, one of whose steps ran out of memory holding a tensor, the live bytes are what
    they were before it (the model's parameters and buffers)."""
    real = probe_module.run_probe

    def none_runs_out(model, batch, name, kwargs, mixed, loss_fn=None):
        if name == "none":
            held = torch.ones(1 << 16)  # alive in this frame, which the error's traceback holds
            raise torch.cuda.OutOfMemoryError(f"simulated, holding {held.numel()} floats")
        return real(model, batch, name, kwargs, mixed, loss_fn)

    monkeypatch.setattr(probe_module, "run_probe", none_runs_out)
    trainer = _trainer(tokenizer, dataset, tmp_path)
    use_settings(memory_budget_gb=64.0)
    model = trainer.model
    gc.collect()
    tracker = policy.LiveBytes()
    for tensor in [*model.parameters(), *model.buffers()]:
        tracker.track(tensor)
    tracker.check()
    before = tracker.current
    with tracker.measuring():
        decision = wiring._decide_locally(trainer, current())
    dispatch._state.__dict__.pop("positions", None)  # the varlen path's boundaries of its last batch
    gc.collect()
    tracker.sweep()
    assert decision.policy == "selective" and "ran out of memory" in decision.rejected["none"]
    assert tracker.current == before  # every tensor the probe made is gone, the failed step's too
    assert all(p.grad is None for p in model.parameters())


def test_completed_probe_steps_keep_the_allocator_cache_and_a_failed_one_frees_it(tokenizer, dataset, tmp_path,
                                                                                  use_settings, monkeypatch):
    """Emptying the CUDA allocator's cache after every probe step made the next step allocate each block from the
    driver again; only a step that ran out of memory (whose blocks may be fragmented) has the cache freed."""
    real_step, real_release = probe_module.run_probe, probe_module.release
    calls = []

    def none_runs_out(model, batch, name, kwargs, mixed, loss_fn=None):
        calls.append(("step", name))
        if name == "none":
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_step(model, batch, name, kwargs, mixed, loss_fn)

    def recorded(device, cache=True):
        calls.append(("release", cache))
        return real_release(device, cache)

    monkeypatch.setattr(probe_module, "run_probe", none_runs_out)
    monkeypatch.setattr(probe_module, "release", recorded)
    monkeypatch.setattr(policy, "release", recorded)  # the ladder's release after a failed step
    trainer = _trainer(tokenizer, dataset, tmp_path)
    use_settings(memory_budget_gb=64.0)
    decision = wiring._decide_locally(trainer, current())
    assert "ran out of memory" in decision.rejected["none"], decision.summary()
    after = {}
    for index, call in enumerate(calls[:-1]):
        if call[0] == "step":
            after.setdefault(call[1], []).append(calls[index + 1])
    assert after["none"] == [("release", True)], calls  # its frames gone, freed again by the ladder:
    failed = calls.index(("step", "none"))
    assert calls[failed + 2] == ("release", True), calls
    completed = [name for name in after if name != "none"]
    assert completed and all(after[name] == [("release", False)] * len(after[name]) for name in completed), calls


def test_a_generous_budget_chooses_as_before(tokenizer, dataset, tmp_path, use_settings):
    """The fastest candidate, with the same predicted peak as the probe before steps were predicted (each
    candidate's peak from ``predicted_peak`` alone, fastest first)."""
    trainer = _trainer(tokenizer, dataset, tmp_path, batch=2)
    use_settings(memory_budget_gb=64.0)
    spec, extra, loss = wiring.probe_spec(trainer), wiring.extra_bytes(trainer), wiring.trainer_loss(trainer)
    before = policy.choose(policy.POLICIES, lambda name: policy.predicted_peak(trainer.model, spec, name, {}, None,
                                                                                None, loss_fn=loss), 64 * GIB, extra)
    decision = wiring._decide_locally(trainer, current())
    assert before[0] == decision.policy == "none"
    assert list(decision.rejected) == ["mlp_recompute"]  # not offered (no fused MLP on a CPU), with its reason
    assert abs(decision.peaks["none"] - before[1]["none"]) <= SLACK


# --------------------------------------------------------------------------- the CUDA cap


def test_the_cuda_cap_holds_the_allocator_to_the_budget_and_is_put_back(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: calls.append(round(fraction, 4)))
    monkeypatch.setattr(meter, "_fraction_getter", lambda: (lambda device=None: 0.9))
    device = torch.device("cuda", 0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with policy.memory_cap(device, 20 * GIB):
            assert calls == ["empty", 0.25]
            raise torch.cuda.OutOfMemoryError("a step past the cap")
    assert calls == ["empty", 0.25, 0.9]  # the user's own fraction is back, after an error too
    calls.clear()
    with policy.memory_cap(device, 200 * GIB):  # over the card: a tighter fraction already set is kept
        pass
    assert calls == ["empty", 0.9, 0.9]
    calls.clear()
    with policy.memory_cap(torch.device("cpu"), 1), policy.memory_cap(device, None):
        pass
    assert calls == []
