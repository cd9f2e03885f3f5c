"""The training scenarios of ``tests/test_distributed.py``, run in every rank of a 2-process launch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT NAME[,NAME...]

(gloo on CPU; the test sets ``PYTHONPATH`` to the repository and ``CUDA_VISIBLE_DEVICES=""``, and
writes ``OUT/context.json``: the FSDP environment of ``docs/accelerate/fsdp2.yaml``).
Each scenario builds a tiny model and an unchanged ``SFTTrainer`` script's trainer, trains it and
writes what the rank saw to ``OUT/<name>.rank<r>.json``: the patches applied, the plan, every
batch the model trained on (layout, boundaries, ``num_items_in_batch``), the attention backend
calls, the checkpointing decision and the checkpoint function on the layers, the optimizer's
groups, the per-step losses. A scenario that raises writes ``OUT/<name>.rank<r>.error`` and ends
the launch (the other rank is stopped by torchrun).

The same scenario functions run in the test process with one process and the same *global*
batch (``per_device_train_batch_size`` times the world size): the single-process reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback

if __name__ == "__main__":  # launched as a script: import the repository's tests package and plugin
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import unsloth_patch  # noqa: E402  (before TRL, as a user's script would)

GLOBAL_BATCH = 4  # sequences per optimizer micro-step, over all ranks
MAX_LENGTH = 64
LEARNING_RATE = 1e-4
EMBEDDING_LR = 1e-3  # ten times the rest: its effect shows in the losses after the first step
SLACK = 4096  # bytes of slack on probed peaks (see tests/test_checkpointing.py)
GIB = 1 << 30
PROCESS_GROUP_TIMEOUT_S = 90  # a collective that one rank never reaches fails instead of hanging


# --------------------------------------------------------------------------- environment


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def settings(**values):
    """The plugin's toggles for one scenario (as the UNSLOTH_PATCH_* variables would set them)."""
    from unsloth_patch import settings as module

    saved = module.current()
    module.set_current(dataclasses.replace(saved, **values))
    try:
        yield
    finally:
        module.set_current(saved)


@contextlib.contextmanager
def environment(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def fsdp_on_cpu(fsdp_env: dict):
    """accelerate's FSDP2 path on CPU processes.

    ``fsdp_env`` is what ``accelerate launch --config_file docs/accelerate/fsdp2.yaml`` exports
    (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION=2``, ...). accelerate 1.15 selects
    ``DistributedType.FSDP`` only for GPU-like device types (``AcceleratorState.__init__`` checks
    MULTI_GPU/MLU/SDAA/MUSA/NPU/XPU/HPU/NEURON) and silently trains CPU processes with DDP
    (``MULTI_CPU``) even with an FSDP plugin. This sets the distributed type accelerate would set
    on GPUs, after its own initialisation, when it was given an FSDP plugin: everything from there
    on (``fsdp2_prepare_model``, ``fully_shard`` with gloo, the optimizer's switch to the sharded
    parameters, transformers' FSDP branches) is accelerate's and torch's own code.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init
    try:
        with environment(fsdp_env):
            yield
    finally:
        AcceleratorState.__init__ = original


# --------------------------------------------------------------------------- observation


class Recorder:
    """What the trainer's model actually trained on, per micro-step, and the attention it used."""

    def __init__(self):
        self.batches: list = []
        self.step_losses: list = []  # what each training_step returned: the terms of the logged loss
        self.attention: dict = {}

    def watch(self, trainer) -> None:
        compute_loss = trainer.compute_loss
        training_step = trainer.training_step
        recorder = self

        stepping_now = []

        def recording(model, inputs, *args, **kwargs):
            if stepping_now:  # a training step's batch (the checkpointing probe calls compute_loss too)
                recorder.batches.append(describe_batch(trainer, model, inputs, kwargs.get("num_items_in_batch")))
            return compute_loss(model, inputs, *args, **kwargs)

        def stepping(*args, **kwargs):
            stepping_now.append(True)
            try:
                loss = training_step(*args, **kwargs)
            finally:
                stepping_now.pop()
            recorder.step_losses.append(float(loss.detach().double().mean()))
            return loss

        trainer.compute_loss = recording
        trainer.training_step = stepping

    @contextlib.contextmanager
    def counting_attention(self):
        from unsloth_patch.attention import backends

        run = backends.run
        recorder = self

        def counted(backend, *args, **kwargs):
            recorder.attention[backend] = recorder.attention.get(backend, 0) + 1
            return run(backend, *args, **kwargs)

        backends.run = counted
        try:
            yield
        finally:
            backends.run = run


def _base(model):
    from unsloth_patch.patches.trainer_facts import base_model

    inner = getattr(model, "module", model)  # DDP
    return base_model(inner)


def describe_batch(trainer, model, inputs, num_items) -> dict:
    import torch

    ids = inputs["input_ids"]
    labels = inputs.get("labels")
    cu = inputs.get("cu_seq_lens_q")
    base = _base(model)
    functions = sorted({getattr(getattr(m, "_gradient_checkpointing_func", None), "__name__",
                                type(getattr(m, "_gradient_checkpointing_func", None)).__name__)
                        for m in base.modules() if getattr(m, "gradient_checkpointing", False)})
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.reshape(-1)[0].item()
    return {
        "shape": list(ids.shape),
        "attention_mask": "attention_mask" in inputs,
        "position_ids": "position_ids" in inputs,
        "cu_seq_lens_q": cu.tolist() if isinstance(cu, torch.Tensor) else None,
        "labels": int((labels != -100).sum()) if isinstance(labels, torch.Tensor) else None,
        "num_items_in_batch": None if num_items is None else float(num_items),
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "checkpoint_functions": functions,
        "training": bool(model.training),
    }


def describe_groups(trainer) -> list:
    from torch.distributed.tensor import DTensor

    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = []
    for group in trainer.optimizer.param_groups:
        params = group["params"]
        groups.append({
            "lr": group.get("initial_lr", group["lr"]),
            "weight_decay": group.get("weight_decay"),
            "names": [names.get(id(p), "?") for p in params],
            "dtensor": [isinstance(p, DTensor) for p in params],
            "local_numel": [(p.to_local() if isinstance(p, DTensor) else p).numel() for p in params],
            "numel": [p.numel() for p in params],
        })
    return groups


def embedding_names(trainer) -> list:
    from unsloth_patch.patches.embedding_lr import embedding_parameter_ids

    ids = embedding_parameter_ids(trainer.model)
    return sorted(n for n, p in trainer.model.named_parameters() if id(p) in ids)


# --------------------------------------------------------------------------- one trainer


def build(out_dir, accumulation=1, steps=3, checkpointing_default=False, **overrides):
    """The user's unchanged script: tiny model, tokenizer, chat data, SFTConfig, SFTTrainer."""
    from tests.helpers import config_fields, sft_config, sft_trainer, text_dataset
    from trl import SFTConfig
    from unsloth_patch.patches import checkpointing as wiring
    from unsloth_patch.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    dataset = text_dataset(tokenizer, limit=16)
    fields = config_fields(SFTConfig)
    values = dict(max_length=MAX_LENGTH, per_device_train_batch_size=GLOBAL_BATCH // world_size(),
                  gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=LEARNING_RATE,
                  embedding_learning_rate=EMBEDDING_LR, average_tokens_across_devices=True)
    if "bf16" in fields:
        values["bf16"] = False  # fp32 on every TRL (some default to bf16 where the CPU has it)
    values.update(overrides)
    if values["embedding_learning_rate"] is None:  # also the stock run's config, which has no such field
        del values["embedding_learning_rate"]
    config = sft_config(out_dir, **values)
    if checkpointing_default:
        # TRL >= 0.24 turns gradient checkpointing on by default; on older TRL set it as that default would
        for name in wiring.FLAG_FIELDS:
            if hasattr(config, name):
                object.__setattr__(config, name, True)
    model = build_model("llama", vocab_size=len(tokenizer), seed=0)
    return sft_trainer(model, tokenizer, dataset, config)


def train(trainer, recorder: Recorder) -> dict:
    from tests.helpers import losses
    from unsloth_patch import checkpointing, fallback

    recorder.watch(trainer)
    started = time.perf_counter()
    with recorder.counting_attention():
        trainer.train()
    decision = checkpointing.last_decision()
    plan = unsloth_patch.last_plan()
    return {
        "rank": rank(),
        "world_size": world_size(),
        "seconds": time.perf_counter() - started,
        "applied": sorted(r.name for r in unsloth_patch.report() if r.applied),
        "plan": plan.as_dict() if plan is not None else None,
        "decision": decision.as_dict() if decision is not None else None,
        "losses": losses(trainer),  # as logged (rounded to 4 decimals by transformers 4.x)
        "micro_losses": recorder.step_losses,
        "accumulation": int(trainer.args.gradient_accumulation_steps),
        "batches": recorder.batches,
        "attention": recorder.attention,
        "groups": describe_groups(trainer),
        "embedding_names": embedding_names(trainer),
        "wrapper": type(trainer.model_wrapped).__name__,
        "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)),
        "fallbacks": fallback.failures(),
        # what accelerate trained with: transformers 4.x takes a leaked ACCELERATE_MIXED_PRECISION over bf16=False
        "mixed_precision": str(trainer.accelerator.mixed_precision),
    }


def peaks_of(trainer) -> tuple:
    """Probed peak of ``none`` and ``selective`` on this trainer's probe batch, and the later extra."""
    from unsloth_patch import checkpointing as policy
    from unsloth_patch.patches import checkpointing as wiring
    from unsloth_patch.patches.training_edits import active

    spec = wiring.probe_spec(trainer)
    kwargs, mixed, loss = wiring.kwargs_of(trainer.args), wiring.mixed_precision(trainer), wiring.trainer_loss(trainer)
    with active(trainer):  # the probe runs with the plan's model edits in place, as train() has them
        peaks = {name: policy.predicted_peak(trainer.model, spec, name, kwargs, mixed, None, loss_fn=loss)
                 for name in ("none", "selective")}
    return peaks, wiring.extra_bytes(trainer)


def between_none_and_selective(trainer):
    """A budget (GiB) under which ``selective`` fits and ``none`` does not, or None if there is none."""
    peaks, extra = peaks_of(trainer)
    if peaks["none"] <= peaks["selective"] + 4 * SLACK:
        return None, peaks, extra
    return (peaks["selective"] + extra + SLACK) / GIB, peaks, extra


# --------------------------------------------------------------------------- scenarios

SCENARIOS: dict = {}


def scenario(function):
    SCENARIOS[function.__name__] = function
    return function


@scenario
def ddp(out_dir, context):
    """DDP, padding-free on, no accumulation; TRL's checkpointing default as it is (no budget on CPU)."""
    recorder = Recorder()
    with settings(padding_free="on"):
        return train(build(out_dir, accumulation=1, steps=3), recorder)


@scenario
def ddp_accumulation(out_dir, context):
    """DDP, padding-free on, two micro-batches per step."""
    recorder = Recorder()
    with settings(padding_free="on"):
        return train(build(out_dir, accumulation=2, steps=2), recorder)


@scenario
def ddp_local_counts(out_dir, context):
    """average_tokens_across_devices=False: each rank normalises by its own count, stock and patched."""
    result = {}
    for name, active in (("stock", False), ("patched", True)):
        if not active:
            unsloth_patch.remove()
        try:
            with settings(padding_free="on"):
                result[name] = train(build(f"{out_dir}/{name}", accumulation=2, steps=2, embedding_learning_rate=None,
                                           average_tokens_across_devices=False), Recorder())
        finally:
            unsloth_patch.apply()
    return result


def fsdp2_unsupported():
    """Why this transformers cannot train with FSDP2, or None.

    FSDP2 needs the model and the optimizer prepared together (accelerate refuses the model
    alone); transformers that delay the optimizer under every FSDP (4.46: "When using FSDP2, a
    model and optimizer must be passed together to `Accelerator.prepare()`") cannot.
    """
    import inspect

    import transformers
    import transformers.trainer

    if "is_fsdp2" not in inspect.getsource(transformers.trainer):
        return (f"transformers {transformers.__version__}'s Trainer prepares the model before creating the "
                "optimizer under every FSDP, which accelerate refuses for FSDP2 (model and optimizer must be "
                "prepared together)")
    return None


@scenario
def fsdp2(out_dir, context):
    """FSDP2 through accelerate (the docs' fsdp2.yaml environment), padding-free, accumulation 2,
    TRL's default checkpointing replaced by the probe's choice under a budget where only
    selective checkpointing fits."""
    why = fsdp2_unsupported()
    if why is not None:
        return {"skipped": why}
    recorder = Recorder()
    with settings(padding_free="on"):
        with fsdp_on_cpu(context["fsdp_env"]):
            trainer = build(out_dir, accumulation=2, steps=2, checkpointing_default=True)
            budget, peaks, extra = between_none_and_selective(trainer)
            with settings(padding_free="on", memory_budget_gb=budget if budget is not None else 64.0):
                result = train(trainer, recorder)
                # a trainer handed the sharded model: its forward runs collectives, so no probe at all
                from unsloth_patch.patches import checkpointing as wiring
                from unsloth_patch.settings import current

                result["blocker_when_sharded"] = wiring.blocker(trainer, current())
    result.update(probe_budget_gb=budget, probe_peaks=peaks, probe_extra=extra)
    return result


@scenario
def probe_agreement(out_dir, context):
    """Rank 0's budget fits ``none``; rank 1's only ``selective``: both must train with ``selective``."""
    recorder = Recorder()
    with settings(padding_free="on"):
        trainer = build(out_dir, accumulation=1, steps=3, checkpointing_default=True)
        budget, peaks, extra = between_none_and_selective(trainer)
        mine = 64.0 if rank() == 0 or budget is None else budget
        with settings(padding_free="on", memory_budget_gb=mine):
            result = train(trainer, recorder)
    result.update(probe_budget_gb=mine, probe_peaks=peaks, probe_extra=extra)
    return result


@scenario
def probe_out_of_memory(out_dir, context):
    """Rank 1 runs out of memory in every probe step; rank 0 fits ``none``."""
    import torch
    from unsloth_patch import checkpointing as policy

    real = policy.probe.run_probe

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("injected: CUDA out of memory in rank 1's probe step")

    if rank() == 1:
        policy.probe.run_probe = out_of_memory
    try:
        with settings(padding_free="on", memory_budget_gb=64.0):
            return train(build(out_dir, accumulation=1, steps=1, checkpointing_default=True), Recorder())
    finally:
        policy.probe.run_probe = real


@scenario
def probe_error(out_dir, context):
    """Rank 1's probe raises an error that is not an out-of-memory; rank 0 fits ``none``."""
    from unsloth_patch import checkpointing as policy

    real = policy.measure

    def broken(*args, **kwargs):
        raise RuntimeError("injected: rank 1's probe failed")

    if rank() == 1:
        policy.measure = broken
    try:
        with settings(padding_free="on", memory_budget_gb=64.0):
            return train(build(out_dir, accumulation=1, steps=1, checkpointing_default=True), Recorder())
    finally:
        policy.measure = real


@scenario
def collator_fallback(out_dir, context):
    """Rank 1's padding-free collator fails at its first batch: it trains on TRL's padded batches,
    rank 0 on flat ones, and the loss-token count stays the padded run's."""
    from unsloth_patch import collate, fallback

    real = collate.flatten_batch

    def broken(*args, **kwargs):
        raise RuntimeError("injected: rank 1's collator failed")

    if rank() == 1:
        collate.flatten_batch = broken
    try:
        with settings(padding_free="on"):
            return train(build(out_dir, accumulation=2, steps=2), Recorder())
    finally:
        collate.flatten_batch = real
        fallback.reset()


@contextlib.contextmanager
def fused_layers_on_cpu(recorder: Recorder):
    """The fused-layer Triton kernels on CPU processes (run under ``TRITON_INTERPRET=1``).

    The trainer fuses layers only on CUDA parameters (``layers._model_reason``); here that device
    rule is lifted, nothing else, and each kernel call is counted.
    """
    from unsloth_patch import layers, rope_fusion
    from unsloth_patch.kernels import rmsnorm, swiglu

    saved = layers._model_reason, rmsnorm.rms_norm, swiglu.gated_activation, rope_fusion._kernel

    def counted(name, function):
        def call(*args, **kwargs):
            recorder.attention[name] = recorder.attention.get(name, 0) + 1
            return function(*args, **kwargs)
        return call

    layers._model_reason = lambda model: None
    rmsnorm.rms_norm = counted("kernel rms_norm", saved[1])
    swiglu.gated_activation = counted("kernel gated_activation", saved[2])
    rope_fusion._kernel = counted("kernel rope", saved[3])
    try:
        yield
    finally:
        layers._model_reason, rmsnorm.rms_norm, swiglu.gated_activation, rope_fusion._kernel = saved


def _with_fused(result):
    from unsloth_patch import layers

    return dict(result, fusion=layers.last_fusion())


@scenario
def ddp_kernels(out_dir, context):
    """DDP with the fused RMSNorm / gated-MLP / RoPE kernels and TRL's checkpointing default, accumulation 2."""
    recorder = Recorder()
    with settings(padding_free="on"), fused_layers_on_cpu(recorder):
        return _with_fused(train(build(out_dir, accumulation=2, steps=2), recorder))


def _fsdp2_fused(out_dir, context, kernels_off):
    why = fsdp2_unsupported()
    if why is not None:
        return {"skipped": why}
    recorder = Recorder()
    with settings(padding_free="on", kernels_off=kernels_off), fsdp_on_cpu(context["fsdp_env"]), \
            fused_layers_on_cpu(recorder):
        trainer = build(out_dir, accumulation=2, steps=2, checkpointing_default=True)
        budget, peaks, extra = between_none_and_selective(trainer)
        with settings(padding_free="on", kernels_off=kernels_off,
                      memory_budget_gb=budget if budget is not None else 64.0):
            result = _with_fused(train(trainer, recorder))
    return dict(result, probe_budget_gb=budget, probe_peaks=peaks, probe_extra=extra)


@scenario
def fsdp2_kernels(out_dir, context):
    """FSDP2 with the fused kernels and selective checkpointing (recomputed through the kernels; ``mlp_recompute``,
    tried before it, turned off)."""
    return _fsdp2_fused(out_dir, context, ("mlp_recompute",))


@scenario
def fsdp2_mlp_recompute(out_dir, context):
    """FSDP2 with the fused kernels under ``mlp_recompute``: the budget that fits selective fits it first."""
    return _fsdp2_fused(out_dir, context, ())


# --------------------------------------------------------------------------- the launch


def main(argv) -> int:
    import datetime

    import torch.distributed as dist

    out, names = argv[0], argv[1].split(",")
    path = os.path.join(out, "context.json")
    context = json.load(open(path)) if os.path.exists(path) else {}
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    me = dist.get_rank()
    for name in names:
        started = time.perf_counter()
        try:
            result = SCENARIOS[name](os.path.join(out, "runs", name), context)
        except BaseException:
            with open(os.path.join(out, f"{name}.rank{me}.error"), "w") as f:
                f.write(traceback.format_exc())
            sys.stderr.write(f"[rank {me}] scenario {name} failed:\n{traceback.format_exc()}\n")
            sys.stderr.flush()
            os._exit(3)
        result = dict(result, scenario_seconds=time.perf_counter() - started)
        with open(os.path.join(out, f"{name}.rank{me}.json"), "w") as f:
            json.dump(result, f)
        print(f"[rank {me}] {name}: {time.perf_counter() - started:.1f}s", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
