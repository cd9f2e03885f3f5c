"""Compile the kernels a trainer will use while the script builds it, on background threads.

Triton compiles each kernel variant at its first launch: on a cold cache several seconds that a
user would otherwise wait for at the first training step. A script spends time of its own before
training (loading the model's weights, tokenising and truncating the dataset, building the
collator), so the compilation starts as early as what it needs is known, on threads, from what the
model's config says (head counts and dim, windows, soft-capping, norm sizes, the MLP's activation,
rotary embeddings): when a half-precision model is built in a script that imported TRL
(``model_warmup``: its compute dtype is its own), else at ``SFTTrainer(...)``, where the training
arguments give the compute dtype; a variant begun once is not begun again. ``train()`` waits for
them before its first launch. Only on a CUDA GPU with Triton, and only for kernels the toggles
leave on. A variant the run turns out not to need costs a compile and nothing else; an error in
the warm-up is logged at debug level and changes nothing (the real calls keep their fallbacks).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

from . import log
from .gc_freeze import quick_collections

_lock = threading.Lock()
_threads: list = []  # compile threads of ours not yet waited for (one per start that had new variants)
_begun: set = set()  # (spec, device) begun in this process: compiled or compiling, never begun twice
_outcome: dict = {}
_started: dict = {}  # device and compute dtype of the warm-up begun last (for start_task)
_tasks: list = []  # threads of start_task, joined by wait()


def specs_for(model_config, compute_dtype, param_dtype, settings) -> list:
    """The kernel variants a model of this config is likely to launch in training."""
    from .kernels import warmup as kw
    from .kernels.varlen_attention import SUPPORTED_HEAD_DIMS

    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = getattr(text, "hidden_size", None)
    heads = getattr(text, "num_attention_heads", None)
    if not (isinstance(hidden, int) and isinstance(heads, int) and heads):
        return []
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    family = str(getattr(text, "model_type", ""))
    specs = []
    if settings.attention != "off" and settings.padding_free != "off" and head_dim in SUPPORTED_HEAD_DIMS:
        softcap = getattr(text, "attn_logit_softcapping", None)
        window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
        specs.append(kw.AttentionSpec(heads, kv_heads, head_dim, compute_dtype, None, softcap))
        if window:
            specs.append(kw.AttentionSpec(heads, kv_heads, head_dim, compute_dtype, int(window), softcap))
    def kernel_on(name):
        return settings.kernels != "off" and name not in getattr(settings, "kernels_off", ())

    if kernel_on("rmsnorm"):
        offset = 1.0 if family.startswith("gemma") else 0.0
        specs.append(kw.NormSpec(hidden, param_dtype, param_dtype, offset))
        if family.startswith("qwen3") or family in ("olmo2", "gemma3"):  # per-head q/k norms
            specs.append(kw.NormSpec(head_dim, param_dtype, param_dtype, offset))
    if kernel_on("swiglu"):
        specs.append(kw.GatedSpec(compute_dtype, gelu=family.startswith("gemma")))
    if kernel_on("rope") and _full_rotary(text) and head_dim % 2 == 0:
        specs.append(kw.RopeSpec(heads, kv_heads, head_dim, compute_dtype, param_dtype))
    return specs


def _full_rotary(text_config) -> bool:
    """Whether the config describes rotary embeddings over the whole head (what the RoPE kernel takes)."""
    has_rope = any(getattr(text_config, name, None) is not None
                   for name in ("rope_theta", "rope_parameters", "rope_scaling"))
    partial = getattr(text_config, "partial_rotary_factor", None)
    return has_rope and partial in (None, 1, 1.0)


def start(model, args, settings, where: str = "at SFTTrainer()") -> bool:
    """Begin compiling for ``model`` (a built model, not a hub id) trained with ``args``; True if begun.

    ``args`` None: the model was just built and no training arguments exist yet; only a bf16 or fp16
    model is warmed then (it computes in its own dtype under any mixed-precision setting), a float32
    one waits for ``SFTTrainer(...)``, whose arguments say. Variants already begun are left out;
    with arguments, the device and compute dtype are kept for ``start_task`` even when none is new.
    """
    try:
        import torch

        if isinstance(model, str) or not torch.cuda.is_available() or not hasattr(model, "config"):
            return False
        from .kernels._triton import triton

        if triton is None:
            return False
        parameter = next(iter(model.parameters()), None)
        param_dtype = parameter.dtype if parameter is not None else torch.float32
        if args is None:  # a half-precision model computes in its own dtype: no arguments needed
            if param_dtype not in (torch.bfloat16, torch.float16):
                return False
            compute_dtype = param_dtype
        elif getattr(args, "bf16", False):
            compute_dtype = torch.bfloat16
        elif getattr(args, "fp16", False):
            compute_dtype = torch.float16
        else:
            compute_dtype = param_dtype
        specs = specs_for(model.config, compute_dtype, param_dtype, settings)
        if not specs:
            return False
        # this process's GPU: under torchrun/accelerate the local rank's (the default device is not set yet)
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device() if torch.cuda.is_initialized() else 0))
        device = torch.device("cuda", index)
    except Exception as exc:
        log.logger.debug("kernel warm-up not started: %s", exc)
        return False
    with _lock:
        if args is not None or not _started:
            _started.update(device=device, compute_dtype=compute_dtype)
        new = [spec for spec in specs if (spec, device) not in _begun]
        if not new:
            return False
        _begun.update((spec, device) for spec in new)
        thread = threading.Thread(target=_run, args=(new, device), name="unsloth_patch-kernel-warmup", daemon=True)
        _threads.append(thread)
        _outcome.setdefault("begun", where)
        _outcome.setdefault("first_begun_at", time.perf_counter())
    thread.start()
    return True


def start_task(name: str, launch, key=None) -> bool:
    """Compile kernels that are not ours but that the first step would compile (TRL's fused LM head),
    beside ours, on a thread of their own: ``launch(device, compute_dtype)`` runs them once. Only once
    a warm-up of ours was begun in this process (so on a CUDA GPU with Triton), on its device and
    compute dtype — also when ours already finished (a dataset that took longer than our kernels).
    ``key`` (hashable: what the launch specialises on) makes a second start of the same launch on the
    same device and dtype a no-op. True if begun."""
    with _lock:
        if not _started:  # set with our warm-up's thread, never cleared
            return False
        device, compute_dtype = _started["device"], _started["compute_dtype"]
        if key is not None:
            if (name, key, device, compute_dtype) in _begun:
                return False
            _begun.add((name, key, device, compute_dtype))

    def run():
        import torch

        from . import compile_key

        started = time.perf_counter()
        error = None
        compile_key.prime("in the warm-up")  # Triton hashes itself once, not once per compiling thread
        try:
            with torch.cuda.device(device):
                launch(device, compute_dtype)
                torch.cuda.synchronize(device)
        except Exception as exc:  # never reaches the user; the real call compiles as it would have
            error = f"{type(exc).__name__}: {exc}"
            log.logger.debug("kernel warm-up: %s failed (%s)", name, error)
        with _lock:
            _outcome.setdefault("tasks", {})[name] = {"seconds": time.perf_counter() - started, "error": error}

    thread = threading.Thread(target=run, name=f"unsloth_patch-warmup-{name}", daemon=True)
    with _lock:
        _tasks.append(thread)
    thread.start()
    return True


def on_triton_import(module=None) -> bool:
    """Hook at Triton's import (often inside ``import torch`` or TRL's): start Triton's
    once-per-process hashing of itself (``compile_key``) on a background thread, while the
    script goes on importing and building its model. Only where a GPU driver is visible and some
    kernel of ours is on; True if begun."""
    from .settings import current

    settings = current()
    if settings.kernels == "off" and settings.attention == "off":
        return False
    if not gpu_driver_visible(os.environ, os.path.exists):
        return False
    from . import compile_key

    return compile_key.prime_in_background("at Triton's import") is not None


# what a GPU driver leaves in the file system (NVIDIA, AMD): seen without initialising CUDA
_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")


def gpu_driver_visible(environ, exists) -> bool:
    """Whether Triton could compile for a GPU here, judged without touching CUDA (a pure check:
    ``environ`` a mapping, ``exists`` a path test). False under Triton's interpreter, and when the
    visible-devices variables hide every device."""
    from .settings import triton_interpreting

    if triton_interpreting(environ):
        return False
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        if name in environ and environ[name].strip() in ("", "-1"):
            return False
    return any(exists(path) for path in _DRIVER_FILES)


def _run(specs, device) -> None:
    import torch

    from . import compile_key
    from .kernels.warmup import warm_up

    started = time.perf_counter()
    earlier = compile_key.primed()
    key = compile_key.prime("in the warm-up")  # once, before the compile threads (each would hash it)
    if key is not None and earlier is None:  # computed now, or waited for here: this warm-up's cost
        with _lock:
            _outcome["compile_key"] = dict(key, waited=time.perf_counter() - started)
    try:
        with torch.cuda.device(device):
            failed = warm_up(specs, device)
            torch.cuda.synchronize(device)
    except Exception as exc:  # never reaches the user
        failed = [(None, f"{type(exc).__name__}: {exc}")]
    with _lock:  # several starts (model built, then SFTTrainer()) add up
        _outcome["seconds"] = time.perf_counter() - _outcome.get("first_begun_at", started)
        _outcome["specs"] = _outcome.get("specs", 0) + len(specs)
        _outcome["failed"] = list(_outcome.get("failed") or ()) + list(failed)
    for spec, error in failed:
        log.logger.log(logging.DEBUG, "kernel warm-up: %s failed (%s)", spec, error)


def pending() -> bool:
    """Whether a warm-up started in this process has not been waited for yet."""
    with _lock:
        return any(t.is_alive() for t in (*_threads, *_tasks))


def wait(timeout: float = 300.0) -> Optional[dict]:
    """Before the first launch: let a running warm-up finish (so nothing compiles twice). While the
    main thread waits, collections pass over the compile threads' new objects only: a full one would
    hold the GIL they need for 0.25-0.4 s (``gc_freeze``)."""
    with _lock:
        threads = [*_threads, *_tasks]
    if not threads:
        return None
    deadline = time.perf_counter() + timeout
    with quick_collections():
        for thread in threads:
            thread.join(max(0.0, deadline - time.perf_counter()))
    with _lock:
        _tasks[:] = [t for t in _tasks if t.is_alive()]
        _threads[:] = [t for t in _threads if t.is_alive()]
        outcome = dict(_outcome)
        _outcome.clear()  # the next trainer's train() reports its own warm-up, if it begins one
        return outcome


def describe(outcome: Optional[dict]) -> str:
    """One line on a finished warm-up: how many variants, how long, TRL's tasks, what failed."""
    if not outcome:
        return "none"
    failed = len(outcome.get("failed") or ())
    tasks = outcome.get("tasks") or {}
    line = f"{outcome.get('specs', 0)} variants in {outcome.get('seconds', 0.0):.2f} s on compile threads"
    if outcome.get("begun"):
        line += f", begun {outcome['begun']}"
    key = outcome.get("compile_key")
    if key:
        line += f"; Triton compile key {key['seconds']:.2f} s {key['where']}"
        if key.get("where") != "in the warm-up":
            line += f", {key.get('waited', 0.0):.2f} s waited"
        if key.get("error"):
            line += f" (failed: {key['error']})"
    if tasks:
        line += "; " + ", ".join(f"{name} {task['seconds']:.2f} s" + (" (failed)" if task.get("error") else "")
                                 for name, task in tasks.items())
    return line + (f"; {failed} failed" if failed else "")
