"""Compile the warm-up's kernels in worker processes, beside the training process.

``choose_workers`` is a pure decision (facts → how many workers, with the reason, and the reason
for each option not taken); ``compile_in_workers`` starts them (``kernels/precompile.py``), hands
each its share of the tasks and waits. A worker only fills Triton's on-disk cache: whatever it did
not compile, the training process's warm-up compiles as it always did.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass, field

MAX_WORKERS = 8
MIN_CORES_PER_PROCESS = 4  # fewer, and the workers would take the cores TRL's dataset preparation uses
SPARE_CORES = 2  # left to the training process and its dataloader
CONTEXT_BYTES = 1 << 30  # a worker's CUDA context and made-up inputs, rounded up
MARGIN_BYTES = 2 << 30  # free device memory left to the training process while the workers run


@dataclass(frozen=True)
class WorkerChoice:
    workers: int
    reason: str
    not_chosen: dict = field(default_factory=dict)  # option -> why not


def choose_workers(setting: str, tasks: int, device_type: str, interpreting: bool, cpu_count: int,
                   processes_per_host: int, free_bytes) -> WorkerChoice:
    """How many compile worker processes to start for ``tasks`` warm-up tasks (0: threads only)."""
    threads = "compile on threads in the training process"
    if setting == "off":
        return WorkerChoice(0, "UNSLOTH_PATCH_COMPILE_WORKERS=off", {"workers": "switched off"})
    if tasks < 2:
        return WorkerChoice(0, f"{tasks} task(s): nothing to spread", {"workers": "nothing to spread"})
    if device_type != "cuda" or interpreting:
        return WorkerChoice(0, f"{threads} (not a CUDA device)", {"workers": "Triton compiles for a CUDA GPU only"})
    cores = max(1, cpu_count) // max(1, processes_per_host)
    if cores < MIN_CORES_PER_PROCESS:
        return WorkerChoice(0, threads, {"workers": f"{cores} CPU core(s) per training process, fewer than "
                                                    f"{MIN_CORES_PER_PROCESS}"})
    workers = min(tasks, cores - SPARE_CORES, MAX_WORKERS)
    not_chosen = {}
    if free_bytes is not None:
        fit = int((free_bytes - MARGIN_BYTES) // CONTEXT_BYTES)
        if fit < workers:
            not_chosen[f"{workers} workers"] = (f"{free_bytes / 2**30:.1f} GiB free on the device; each worker "
                                                f"needs about {CONTEXT_BYTES / 2**30:.0f} GiB")
            workers = max(0, fit)
    if workers < 2:
        not_chosen.setdefault("workers", "fewer than 2 would fit")
        return WorkerChoice(0, threads, not_chosen)
    not_chosen["threads only"] = "Triton's front end holds the GIL: threads of one process take turns"
    return WorkerChoice(workers, f"{workers} worker processes for {tasks} tasks ({cores} cores per training "
                                 "process)", not_chosen)


def share(tasks: list, workers: int) -> list:
    """Tasks dealt to ``workers`` groups in turn (the listed order puts the slow attention tasks first)."""
    groups = [tasks[i::workers] for i in range(workers)]
    return [group for group in groups if group]


def worker_environment(environ=None) -> dict:
    """The workers' environment: the training process's (same Triton cache, same visible devices,
    same ``TRITON_*`` options, so the kernels' cache keys are the same), this package importable
    from where it was imported, the plugin itself inactive."""
    env = dict(os.environ if environ is None else environ)
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["UNSLOTH_PATCH_DISABLE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def compile_in_workers(groups: list, device: str, timeout: float = 120.0) -> dict:
    """Run each group of encoded tasks in a worker process on ``device``; returns what they reported.

    Blocking (call it from the warm-up's thread). A worker that fails to start, fails, or outlives
    ``timeout`` is recorded, never raised: the training process compiles what it left.
    """
    started = time.perf_counter()
    env = worker_environment()
    procs = []
    outcome = {"workers": len(groups), "failed": [], "errors": []}
    for group in groups:
        job = json.dumps({"device": device, "tasks": group})
        try:
            proc = subprocess.Popen([sys.executable, "-m", "unsloth_patch.kernels.precompile", job], env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        except OSError as exc:
            outcome["errors"].append(f"could not start a worker: {exc}")
            continue
        procs.append(proc)
    deadline = started + timeout
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            outcome["errors"].append(f"worker {proc.pid}: still running after {timeout:.0f} s, stopped")
            continue
        report = _last_json_line(out)
        if proc.returncode != 0 or report is None:
            tail = (err or "").strip().splitlines()[-1:] or ["no output"]
            outcome["errors"].append(f"worker {proc.pid}: exit {proc.returncode}: {tail[0]}")
            continue
        outcome["failed"].extend(report.get("failed", []))
    outcome["seconds"] = time.perf_counter() - started
    return outcome


def _last_json_line(text: str):
    for line in reversed((text or "").strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None
