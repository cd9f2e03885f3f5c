"""Two processes, gloo, CPU: the plugin under DDP and FSDP2, against the single-process run.

One launch per session (``python -m torch.distributed.run --standalone --nproc_per_node 2``,
``CUDA_VISIBLE_DEVICES=""``, so accelerate and transformers pick the CPU and gloo) runs every
scenario of ``tests/distributed_worker.py`` in both ranks; each rank writes what it saw. The
single-process reference runs the same scenario functions in this process with the same
*global* batch (4 sequences per micro-step: 2 per rank under the launch). fp32 throughout (checked:
accelerate's ``mixed_precision`` is ``no`` in every compared run; on transformers 4.x an
``ACCELERATE_MIXED_PRECISION`` left in the environment would override ``bf16=False``).

What is checked, per rank: the patches applied and the plan; padding-free batches
(``UNSLOTH_PATCH_PADDING_FREE=on``: on a CPU ``auto`` keeps padded batches) whose sequences,
over the two ranks, are the single-process micro-batch's; ``num_items_in_batch`` equal to the
single-process count at every micro-step (transformers sums it over the ranks with
``average_tokens_across_devices``; on transformers that count unshifted labels our
``label_count`` patch adds the masked first labels of every rank); the per-step loss equal to the
single-process loss (<= 1e-5 relative), with and without gradient accumulation; with
``average_tokens_across_devices=False`` (local counts), the stock DDP run's losses; the
embedding learning-rate groups; the checkpointing probe's MAX all-reduce (one rank's budget
fits ``none``, the other's only ``selective``: both train with ``selective``), and no deadlock
when one rank's probe runs out of memory or fails, or one rank's padding-free collator falls
back to padded batches.

FSDP2: accelerate 1.15 selects its FSDP path only for GPU-like devices. On CPU processes
``AcceleratorState`` keeps ``DistributedType.MULTI_CPU`` even when given an FSDP plugin, and
transformers then trains with DDP: an FSDP launch on CPU silently is not FSDP. The worker sets
the distributed type that accelerate sets on GPUs (``fsdp_on_cpu`` in the worker, after
accelerate's own initialisation, only when it was handed an FSDP plugin) and takes its plugin from
the environment that ``accelerate launch --config_file docs/accelerate/fsdp2.yaml`` exports.
Everything else is accelerate's, transformers' and torch's own code: ``fsdp2_prepare_model``,
``fully_shard`` on a CPU device mesh with gloo (torch 2.13 supports it), the optimizer switched
to the sharded DTensor parameters, transformers' FSDP branches. The test asserts the model
really is FSDP2-sharded (``FSDP*`` wrapper class, DTensor parameters holding half the elements
in each rank).

The fused-layer Triton kernels (RMSNorm, gated MLP) need CUDA to be chosen by the trainer; the
``kernels``-marked test at the end (kernels session) lifts that device rule alone and runs them
in the Triton interpreter in both ranks, under DDP and FSDP2 with checkpointing. Not covered on
CPU: our varlen attention Triton kernel (CUDA only; on CPU the attention runs the exact masked
path, which is what is counted here), NCCL, and speed (``docs/distributed.md`` has the 2-GPU
benchmark's commands).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("accelerate")

import unsloth_patch  # noqa: E402
from unsloth_patch import fallback  # noqa: E402

from . import distributed_worker as worker  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCENARIOS = ("ddp", "ddp_accumulation", "ddp_local_counts", "fsdp2", "probe_agreement", "probe_out_of_memory",
             "probe_error", "collator_fallback")
LAUNCH_TIMEOUT_S = 420  # the whole launch; a hung collective fails after the worker's 90 s gloo timeout
RTOL = 1e-5
OURS = ("checkpoint_selective", "checkpoint_offload")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed with the gloo backend",
)


# --------------------------------------------------------------------------- the launch


def _fsdp_environment(config: pathlib.Path) -> dict:
    """The FSDP variables ``accelerate launch --config_file <config>`` exports (accelerate's own parser)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "script.py"])
    _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")}


class Launch:
    """The 2-process launch, started at once and waited for when a result is first read (the
    single-process reference runs in this process meanwhile)."""

    def __init__(self, out: pathlib.Path, command: list, env: dict):
        self.out = out
        self.log = open(out / "launch.log", "w")  # a file: a full pipe would stall the workers meanwhile
        self.started = time.perf_counter()
        # its own process group, so that a timeout ends torchrun and both workers, and nothing else
        self.process = subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.output = None

    def wait(self) -> None:
        if self.output is not None:
            return
        remaining = max(1.0, LAUNCH_TIMEOUT_S - (time.perf_counter() - self.started))
        killed = ""
        try:
            self.process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait()
            killed = f"\n[killed after {LAUNCH_TIMEOUT_S}s]"
        self.log.close()
        self.output = (self.out / "launch.log").read_text(errors="replace") + killed
        self.seconds = time.perf_counter() - self.started

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)

    def close(self) -> None:
        self.kill()
        self.process.wait()
        self.log.close()

    def ranks(self, name: str) -> list:
        self.wait()
        found = []
        for r in (0, 1):
            path = self.out / f"{name}.rank{r}.json"
            if path.exists():
                found.append(json.loads(path.read_text()))
                continue
            error = self.out / f"{name}.rank{r}.error"
            detail = error.read_text()[-4000:] if error.exists() else "(no result: the launch ended before it)"
            pytest.fail(f"scenario {name!r}, rank {r}: {detail}\n--- launch (rc={self.process.returncode}, "
                        f"{self.seconds:.0f}s) output tail ---\n{self.output[-4000:]}")
        return found


def _launch(tmp_path_factory, scenarios, **extra_env):
    out = tmp_path_factory.mktemp("distributed")
    (out / "context.json").write_text(json.dumps({"fsdp_env": _fsdp_environment(ROOT / "docs/accelerate/fsdp2.yaml")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNSLOTH_PATCH_")}
    env.update(CUDA_VISIBLE_DEVICES="", UNSLOTH_PATCH_PADDING_FREE="on", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p), **extra_env)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max_restarts", "0", str(ROOT / "tests" / "distributed_worker.py"), str(out), ",".join(scenarios)]
    return Launch(out, command, env)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    launch = _launch(tmp_path_factory, SCENARIOS)
    try:
        yield launch
    finally:
        launch.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process runs, same global batch: one process, 4 sequences per micro-step."""
    unsloth_patch.apply()
    fallback.reset()
    out = tmp_path_factory.mktemp("single")
    return {name: getattr(worker, name)(str(out / name), {}) for name in ("ddp", "ddp_accumulation")}


# --------------------------------------------------------------------------- helpers


def step_losses(result: dict) -> list:
    """The logged loss of each step, unrounded: the sum of its micro-steps' training_step losses."""
    k = result["accumulation"]
    micro = result["micro_losses"]
    return [sum(micro[i:i + k]) for i in range(0, len(micro), k)]


def global_step_losses(ranks: list) -> list:
    """transformers logs the mean over the ranks of each rank's accumulated loss."""
    per_rank = [step_losses(r) for r in ranks]
    return [sum(values) / len(values) for values in zip(*per_rank)]


def assert_close(got, expected, what):
    assert len(got) == len(expected), (what, got, expected)
    for a, b in zip(got, expected):
        assert abs(a - b) <= RTOL * abs(b), (what, got, expected)


def lengths(batch) -> list:
    cu = batch["cu_seq_lens_q"]
    return [b - a for a, b in zip(cu, cu[1:])]


def counts(result) -> list:
    return [b["num_items_in_batch"] for b in result["batches"]]


def assert_fp32(*results):
    """The runs trained in fp32, as configured (not under an autocast taken from the environment)."""
    found = [r["mixed_precision"] for r in results]
    assert found == ["no"] * len(results), (f"accelerate's mixed precision per run: {found}; these comparisons "
                                            "are fp32 (transformers 4.x lets ACCELERATE_MIXED_PRECISION in the "
                                            "environment override bf16=False)")


def trained_like_reference(ranks, single):
    assert_fp32(*ranks, single)
    assert_close(global_step_losses(ranks), step_losses(single), "per-step loss vs the single-process run")
    for r in ranks:
        assert counts(r) == counts(single), "num_items_in_batch differs from the single-process count"
        for logged, expected in zip(r["losses"], single["losses"]):  # as logged: rounded on transformers 4.x
            assert abs(logged - expected) <= 2e-4 * abs(expected)


# --------------------------------------------------------------------------- tests


def test_patches_apply_in_every_rank(launched, reference):
    single = reference["ddp"]
    ranks = launched.ranks("ddp")
    for r in ranks:
        assert r["world_size"] == 2 and r["wrapper"] == "DistributedDataParallel"
        assert r["applied"] == single["applied"]
        assert {"trainer_plan", "train_collator", "training_edits", "embedding_lr", "checkpointing"} \
            <= set(r["applied"])
        assert r["plan"] == single["plan"] and r["plan"]["padding_free"]
        assert r["fallbacks"] == {}
    assert {r["rank"] for r in ranks} == {0, 1}


@pytest.mark.parametrize("name", ["ddp", "ddp_accumulation"])
def test_padding_free_batches_in_every_rank(launched, reference, name):
    single = reference[name]
    ranks = launched.ranks(name)
    for r in ranks:
        assert r["attention"] and set(r["attention"]) == set(single["attention"])  # our varlen path ran
        for batch in r["batches"]:
            assert batch["shape"][0] == 1 and not batch["attention_mask"] and batch["position_ids"]
            assert batch["attn_implementation"] == single["batches"][0]["attn_implementation"]
    if single["batches"][0]["cu_seq_lens_q"] is not None:
        # the two ranks' sequences of each micro-step are the single-process micro-batch's
        for i, whole in enumerate(single["batches"]):
            mine = sorted(lengths(ranks[0]["batches"][i]) + lengths(ranks[1]["batches"][i]))
            assert mine == sorted(lengths(whole)) and len(mine) == worker.GLOBAL_BATCH


@pytest.mark.parametrize("name", ["ddp", "ddp_accumulation"])
def test_loss_and_loss_token_count_equal_the_single_process_run(launched, reference, name):
    ranks = launched.ranks(name)
    single = reference[name]
    assert len(single["micro_losses"]) == len(single["losses"]) * single["accumulation"]
    trained_like_reference(ranks, single)


def test_local_token_counts_give_the_stock_ddp_losses(launched):
    """average_tokens_across_devices=False: each rank divides by its own count, as stock DDP does."""
    ranks = launched.ranks("ddp_local_counts")
    for r in ranks:
        stock, patched = r["stock"], r["patched"]
        assert stock["applied"] == [] and patched["applied"]  # the stock run had the plugin removed
        assert all(b["attention_mask"] for b in stock["batches"])
        assert all(b["shape"][0] == 1 and not b["attention_mask"] for b in patched["batches"])
        assert counts(patched) == counts(stock)  # this rank's own count, the padded run's
        assert_fp32(stock, patched)
        assert_close(step_losses(patched), step_losses(stock), "rank's loss vs stock DDP")
    logged = [global_step_losses([r[name] for r in ranks]) for name in ("patched", "stock")]
    assert_close(*logged, "logged loss vs stock DDP")


def _check_groups(result, single):
    by_lr = {}
    for group in result["groups"]:
        by_lr.setdefault(group["lr"], []).extend(group["names"])
    assert set(by_lr) == {worker.LEARNING_RATE, worker.EMBEDDING_LR}
    assert sorted(by_lr[worker.EMBEDDING_LR]) == result["embedding_names"] == single["embedding_names"]
    assert sorted(result["embedding_names"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    names = [n for g in result["groups"] for n in g["names"]]
    assert len(names) == len(set(names)) and "?" not in names  # each trainable parameter exactly once
    assert [(g["lr"], g["weight_decay"], sorted(g["names"])) for g in result["groups"]] == \
        [(g["lr"], g["weight_decay"], sorted(g["names"])) for g in single["groups"]]


def test_embedding_learning_rate_groups_in_every_rank(launched, reference):
    for r in launched.ranks("ddp"):
        _check_groups(r, reference["ddp"])
        assert not any(any(g["dtensor"]) for g in r["groups"])


def test_fsdp2_shards_the_model_and_trains_like_the_single_process_run(launched, reference):
    ranks = launched.ranks("fsdp2")
    if "skipped" in ranks[0]:
        pytest.skip(ranks[0]["skipped"])
    for r in ranks:
        assert r["fsdp"] and r["wrapper"].startswith("FSDP"), r["wrapper"]
        # the optimizer holds the sharded parameters, in our embedding groups: half of each tensor per rank
        _check_groups(r, reference["ddp_accumulation"])
        for group in r["groups"]:
            assert all(group["dtensor"])
            assert sum(group["local_numel"]) * 2 == sum(group["numel"])
        assert r["plan"]["padding_free"] and r["fallbacks"] == {}
        assert all(b["shape"][0] == 1 and not b["attention_mask"] for b in r["batches"])
        assert r["attention"]
        # activation checkpointing under FSDP2: the probe's choice, installed on the sharded model's layers
        assert r["probe_budget_gb"] is not None, r["probe_peaks"]
        assert r["decision"]["policy"] == "selective"
        assert all(b["checkpoint_functions"] == ["checkpoint_selective"] for b in r["batches"])
        assert "already distributed (DTensor" in (r["blocker_when_sharded"] or "")
    trained_like_reference(ranks, reference["ddp_accumulation"])


def test_checkpointing_probe_ranks_agree_on_the_more_conservative_policy(launched, reference):
    ranks = launched.ranks("probe_agreement")
    assert ranks[1]["probe_budget_gb"] is not None, ranks[1]["probe_peaks"]
    assert [r["decision"]["local_policy"] for r in ranks] == ["none", "selective"]
    for r in ranks:
        assert r["decision"]["policy"] == "selective" and r["decision"]["probed"]
        assert all(b["checkpoint_functions"] == ["checkpoint_selective"] for b in r["batches"])
    assert "ranks agreed on the more conservative selective" in ranks[0]["decision"]["reason"]
    trained_like_reference(ranks, reference["ddp"])


@pytest.mark.parametrize("name, why", [("probe_out_of_memory", "no candidate fits"),
                                       ("probe_error", "the probe failed (RuntimeError: injected")])
def test_a_probe_failing_in_one_rank_keeps_full_checkpointing_everywhere(launched, reference, name, why):
    ranks = launched.ranks(name)  # both ranks reached the all-reduce and trained: no deadlock
    assert ranks[0]["decision"]["local_policy"] == "none"
    assert ranks[1]["decision"]["local_policy"] == "full" and why in ranks[1]["decision"]["reason"]
    if name == "probe_out_of_memory":
        assert set(ranks[1]["decision"]["peaks"].values()) == {None}  # every candidate ran out of memory
    for r in ranks:
        assert r["decision"]["policy"] == "full"
        assert not any(set(b["checkpoint_functions"]) & set(OURS) for b in r["batches"])
        assert len(r["losses"]) == 1
    assert_fp32(*ranks, reference["ddp"])
    assert_close(global_step_losses(ranks), step_losses(reference["ddp"])[:1], "first step vs single process")


def test_a_collator_falling_back_in_one_rank_keeps_the_counts(launched, reference):
    ranks = launched.ranks("collator_fallback")
    assert "padding-free collator" in ranks[1]["fallbacks"] and ranks[0]["fallbacks"] == {}
    assert all(b["shape"][0] == 1 for b in ranks[0]["batches"])
    assert all(b["attention_mask"] for b in ranks[1]["batches"])  # TRL's padded batches
    trained_like_reference(ranks, reference["ddp_accumulation"])


def test_the_accelerate_config_files_in_docs_launch_ddp_and_fsdp2():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    def parsed(name):
        args = launch_command_parser().parse_args(["--config_file", str(ROOT / "docs/accelerate" / name), "x.py"])
        _validate_launch_command(args)
        return args

    ddp = parsed("ddp.yaml")
    assert ddp.multi_gpu and not ddp.use_fsdp and ddp.num_processes == 2 and ddp.mixed_precision == "no"
    fsdp = _fsdp_environment(ROOT / "docs/accelerate/fsdp2.yaml")
    assert fsdp["ACCELERATE_USE_FSDP"] == "true" and fsdp["FSDP_VERSION"] == "2"
    assert fsdp["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["FSDP_ACTIVATION_CHECKPOINTING"] == "false"  # checkpointing stays TRL's / the probe's
    assert parsed("fsdp2.yaml").num_processes == 2


# --------------------------------------------------------------------------- fused kernels (kernels session)

KERNEL_SCENARIOS = ("ddp_kernels", "fsdp2_kernels", "fsdp2_mlp_recompute")


@pytest.fixture(scope="module")
def launched_kernels(tmp_path_factory):
    pytest.importorskip("triton")
    # the workers are CPU processes: their Triton kernels run in the interpreter, GPU or not here
    launch = _launch(tmp_path_factory, KERNEL_SCENARIOS, TRITON_INTERPRET="1")
    try:
        yield launch
    finally:
        launch.close()


@pytest.fixture(scope="module")
def kernels_reference(tmp_path_factory):
    unsloth_patch.apply()
    fallback.reset()
    return worker.ddp_kernels(str(tmp_path_factory.mktemp("single_kernels")), {})


@pytest.mark.kernels
@pytest.mark.parametrize("name", KERNEL_SCENARIOS)
def test_fused_layer_kernels_under_ddp_and_fsdp2(launched_kernels, kernels_reference, name):
    """The fused RMSNorm / gated-MLP / RoPE Triton kernels (interpreted on CPU) in both ranks, with
    TRL's checkpointing (DDP), or selective or MLP-recompute checkpointing recomputing through them (FSDP2)."""
    ranks = launched_kernels.ranks(name)
    if "skipped" in ranks[0]:
        pytest.skip(ranks[0]["skipped"])
    for r in ranks:
        # 2 layers x 2 norms + final, 2 MLPs, 2 attention modules with RoPE
        assert r["fusion"]["fused"] == {"rmsnorm": 5, "swiglu": 2, "rope": 2}, r["fusion"]
        assert r["attention"].get("kernel rms_norm", 0) > 0 and r["attention"].get("kernel gated_activation", 0) > 0
        assert r["attention"].get("kernel rope", 0) > 0
        assert r["fallbacks"] == {}  # no kernel fell back to its PyTorch reference
        assert all(b["shape"][0] == 1 and not b["attention_mask"] for b in r["batches"])
        if name.startswith("fsdp2"):
            expected = "selective" if name == "fsdp2_kernels" else "mlp_recompute"
            assert r["fsdp"] and r["wrapper"].startswith("FSDP")
            assert r["decision"]["policy"] == expected, r["decision"]["reason"]
            assert all(b["checkpoint_functions"] == [f"checkpoint_{expected}"] for b in r["batches"])
    trained_like_reference(ranks, kernels_reference)
