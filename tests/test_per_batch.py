"""Per-batch checkpointing choices: a batch smaller than the worst one spends the room it leaves under the
budget (a larger MLP chunk, a faster measured policy, its last layers unchecked), never more than the budget
less the margin allows, and trains to the same losses as a run where every batch runs the plan."""

from __future__ import annotations

import pytest

from unsloth_patch.checkpointing import estimate, per_batch
from unsloth_patch.checkpointing.mlp_chunk import Chunk
from unsloth_patch.checkpointing.policy import GIB

from .helpers import use_settings  # noqa: F401  (a fixture)

MIB = 1 << 20
LONGEST = 2048


def _step(sequences, peak, baseline=2 * GIB):
    return estimate.Step(sequences, baseline, ((peak, 0),))


def _anchor():
    """Full checkpointing's 1- and 2-sequence steps, each recomputed layer rising 150 MiB per sequence in its
    recomputation and 60 MiB more in its backward."""
    def full(n):
        phases = ((2 * GIB + n * 200 * MIB, 0),)
        starts, kinds = (0,), ("forward",)
        for _ in range(4):  # four layers
            start = 2 * GIB + n * 100 * MIB
            phases += ((start + n * 150 * MIB, 0), (start + n * 210 * MIB, 0))
            starts += (start, start + n * 150 * MIB)
            kinds += ("recompute", "recomputed")
        return estimate.Step(n, 2 * GIB, phases, starts, kinds)

    return [full(1), full(2)]


def _facts(budget=int(3.37 * GIB), chosen="offload"):
    steps = {"full": _anchor(),
             "mlp_recompute": [_step(2, int(2.94 * GIB)), _step(4, int(3.30 * GIB))],
             "offload": [_step(2, int(2.75 * GIB)), _step(4, int(2.96 * GIB))]}
    chunk = Chunk(3072, 64 * MIB, "", 2048, 65536)
    facts, why = per_batch.facts(chosen, steps, LONGEST, budget, extra=84 * MIB, chunk=chunk)
    assert facts is not None and not why
    return facts


def test_layer_bytes_count_the_recomputation_and_recomputed_bytes_only_what_the_forward_keeps():
    assert estimate.layer_bytes(_anchor()) == (4, 210 * MIB)  # recomputation and backward, per sequence
    assert estimate.recomputed_bytes(_anchor()) == (4, 150 * MIB)  # what an unchecked layer holds


def test_a_small_batch_runs_a_faster_measured_policy_in_one_chunk_with_layers_unchecked():
    facts = _facts()
    tokens = 3 * LONGEST // 2
    choice = per_batch.choose(facts, tokens)
    assert choice.policy == "mlp_recompute" and not choice.planned
    assert choice.chunk >= tokens  # one chunk for the whole batch
    assert choice.predicted <= facts.limit
    layer = 150 * MIB * 1.5
    expected = estimate.peak_at(facts.steps["mlp_recompute"], 1.5) + facts.extra + (tokens - 2048) * 65536
    assert choice.predicted == int(expected + choice.unchecked * layer)
    # the room left after the chunk holds exactly that many layers' forward activations, not one more
    assert choice.unchecked == min(4, int((facts.limit - expected) // layer))
    assert per_batch.choose(_facts(budget=int(3.7 * GIB)), tokens).unchecked > 0


def test_fewer_chunks_come_before_a_faster_policy():
    """At 2.3 sequences the faster mlp_recompute fits only with two chunks; offload fits the batch in one."""
    facts = _facts()
    tokens = int(2.3 * LONGEST)
    faster = estimate.peak_at(facts.steps["mlp_recompute"], tokens / LONGEST) + facts.extra
    assert faster <= facts.limit and (facts.limit - faster) // 65536 + 2048 < tokens  # fits, in two chunks
    choice = per_batch.choose(facts, tokens)
    assert choice.policy == "offload" and choice.chunk >= tokens


def test_the_worst_batch_runs_as_planned_and_every_choice_stays_under_the_margin():
    facts = _facts()
    worst = per_batch.choose(facts, 8 * LONGEST)
    assert worst == per_batch.planned(facts, 8 * LONGEST)
    assert (worst.policy, worst.chunk, worst.unchecked, worst.planned) == ("offload", 3072, 0, True)
    for tokens in range(128, 8 * LONGEST + 1, 128):
        choice = per_batch.choose(facts, tokens)
        assert choice.planned or choice.predicted <= facts.limit, (tokens, choice)
        assert choice.policy in ("mlp_recompute", "offload") and 0 <= choice.unchecked <= 4
        if choice.chunk:
            assert choice.chunk % 256 == 0 and choice.chunk >= 2048


def test_a_roomy_budget_leaves_every_layer_unchecked_and_a_tight_one_none_past_a_few_hundred_tokens():
    assert per_batch.choose(_facts(budget=40 * GIB), 4 * LONGEST).unchecked == 4
    tight = _facts(budget=int(3.15 * GIB))
    assert per_batch.choose(tight, 256).unchecked > 0  # a layer of 256 tokens is small
    assert all(per_batch.choose(tight, t).unchecked == 0 for t in range(2 * LONGEST, 8 * LONGEST, 256))


@pytest.mark.parametrize("chosen, off, why", [
    ("full", None, "TRL's full checkpointing"), ("none", None, "nothing is checkpointed"),
    ("offload", "uniform asked", "uniform asked"), (None, None, "TRL's full checkpointing")])
def test_no_choices_where_the_plan_is_not_ours_or_nothing_is_faster(chosen, off, why):
    facts, reason = per_batch.facts(chosen, {"offload": [_step(2, GIB)]}, LONGEST, 4 * GIB, 0, off=off)
    assert facts is None and why in reason


def test_the_tally_counts_what_the_steps_chose():
    facts = _facts()
    tally = per_batch.Tally()
    batches = (3 * LONGEST // 2, 3 * LONGEST // 2, 8 * LONGEST)
    for tokens in batches:
        tally.note(per_batch.choose(facts, tokens))
    seen = tally.as_dict()
    assert seen["steps"] == 3 and seen["as_planned"] == 1
    assert seen["policies"] == {"mlp_recompute": 2, "offload": 1}
    assert seen["predicted_max_bytes"] == max(per_batch.choose(facts, t).predicted for t in batches)


# --------------------------------------------------------------------------- the mechanism, on a model

torch = pytest.importorskip("torch")


def test_the_dispatcher_leaves_the_chosen_layers_unchecked_with_the_same_gradients():
    from unsloth_patch.checkpointing import PerBatch, blocks, checkpoint_function, install
    from unsloth_patch.tiny import build_model

    model = build_model("llama", vocab_size=97, hidden_size=32, intermediate_size=64, seed=0)
    model.train()
    install(model, "full")
    layers = blocks(model)
    assert len(layers) >= 2
    calls = []

    def counting(function, *args, **kwargs):
        calls.append(per_batch_layer(function))
        return checkpoint_function("full")(function, *args, **kwargs)

    from unsloth_patch.checkpointing import layer_of as per_batch_layer

    dispatcher = PerBatch({"full": counting, "none": None}, "full")
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = dispatcher
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))

    def gradients():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    planned = gradients()
    assert calls == layers  # every layer checkpointed, each call's layer identified
    calls.clear()
    dispatcher.set("full", [id(layers[-1])])
    last_unchecked = gradients()
    assert calls == layers[:-1]
    calls.clear()
    dispatcher.set("none")
    unchecked = gradients()
    assert calls == []
    for name, grad in planned.items():
        assert torch.allclose(grad, last_unchecked[name], rtol=0, atol=1e-6), name
        assert torch.allclose(grad, unchecked[name], rtol=0, atol=1e-6), name


# --------------------------------------------------------------------------- through Trainer.train

pytest.importorskip("trl")


def test_per_batch_choices_train_to_the_losses_of_the_plan(tokenizer, tmp_path, use_settings, monkeypatch):
    """Offload chosen, a roomy simulated budget: each batch leaves its layers unchecked (auto) or runs the plan
    (uniform), with the same losses; train() puts the run's checkpoint function back on the model."""
    from datasets import Dataset

    from unsloth_patch import checkpointing as policy

    from .test_memory_model import LENGTH, _only, _trainer

    words = [400, 300, 200, 150, 150, 140, 130, 120, 110, 100, 90, 80, 70, 60, 50, 40]
    data = Dataset.from_dict({"text": [" ".join(["hello world"] * (n // 6)) for n in words]})
    runs = {}
    for mode in ("auto", "uniform"):
        use_settings(memory_budget_gb=8.0, padding_free="on", checkpointing=mode)
        _only("offload", monkeypatch)
        trainer = _trainer(tokenizer, data, tmp_path / mode, max_length=LENGTH, per_device_train_batch_size=4,
                           max_steps=4, logging_steps=1)
        trainer.train()
        decision = policy.last_decision()
        assert decision.policy == "offload"
        runs[mode] = ([log["loss"] for log in trainer.state.log_history if "loss" in log], decision)
        functions = {type(m.__dict__.get("_gradient_checkpointing_func")).__name__
                     for m in trainer.model.modules() if getattr(m, "gradient_checkpointing", False)}
        assert functions == {"function"}  # the run's offload function, not the per-batch dispatcher
    (auto, chose), (uniform, planned) = runs["auto"], runs["uniform"]
    assert len(auto) == 4 and auto == uniform
    assert chose.per_batch.seen["steps"] == 4 and chose.per_batch.seen["as_planned"] == 0
    assert "0" not in chose.per_batch.seen["unchecked_layers"]
    assert planned.per_batch is None and "uniform" in planned.per_batch_reason
