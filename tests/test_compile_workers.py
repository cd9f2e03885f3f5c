"""The kernel warm-up in worker processes: when workers are used (and why not), that every task
reaches exactly one worker, that a task survives the trip to a worker unchanged, and that a worker
compiles (here: runs in the Triton interpreter) what it is given and reports what failed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from unsloth_patch import compile_workers as cw
from unsloth_patch.settings import read_settings

GiB = 1 << 30


def test_workers_only_where_the_host_has_the_cores_and_the_card_the_memory():
    roomy = dict(tasks=8, device_type="cuda", interpreting=False, cpu_count=16, processes_per_host=1,
                 free_bytes=100 * GiB)
    choice = cw.choose_workers("auto", **roomy)
    assert choice.workers == 8 and "threads only" in choice.not_chosen
    assert cw.choose_workers("auto", **{**roomy, "tasks": 3}).workers == 3  # never more workers than tasks
    assert cw.choose_workers("auto", **{**roomy, "cpu_count": 6}).workers == 4  # two cores left to training
    four_ranks = cw.choose_workers("auto", **{**roomy, "processes_per_host": 4})
    assert four_ranks.workers == 2  # 4 cores per rank
    eight_ranks = cw.choose_workers("auto", **{**roomy, "processes_per_host": 8})
    assert eight_ranks.workers == 0 and "2 CPU core(s) per training process" in eight_ranks.not_chosen["workers"]
    tight = cw.choose_workers("auto", **{**roomy, "free_bytes": 5 * GiB})
    assert tight.workers == 3 and "5.0 GiB free" in tight.not_chosen["8 workers"]
    full = cw.choose_workers("auto", **{**roomy, "free_bytes": 2.5 * GiB})
    assert full.workers == 0 and "GiB free" in full.not_chosen["8 workers"]
    assert cw.choose_workers("auto", **{**roomy, "free_bytes": None}).workers == 8  # unknown: assumed enough
    assert cw.choose_workers("off", **roomy).workers == 0
    assert cw.choose_workers("auto", **{**roomy, "device_type": "cpu"}).workers == 0
    assert cw.choose_workers("auto", **{**roomy, "interpreting": True}).workers == 0
    assert cw.choose_workers("auto", **{**roomy, "tasks": 1}).workers == 0


def test_every_task_goes_to_exactly_one_worker_slow_ones_spread_first():
    tasks = list(range(11))
    groups = cw.share(tasks, 4)
    assert sorted(t for g in groups for t in g) == tasks
    assert [g[0] for g in groups] == [0, 1, 2, 3]  # the first-listed (attention) tasks each get a worker of their own
    assert cw.share(tasks[:2], 4) == [[0], [1]]


def test_the_toggle():
    assert read_settings({}).compile_workers == "auto"
    assert read_settings({"UNSLOTH_PATCH_COMPILE_WORKERS": "OFF"}).compile_workers == "off"
    with pytest.raises(ValueError, match="UNSLOTH_PATCH_COMPILE_WORKERS='threads'.*auto, off"):
        read_settings({"UNSLOTH_PATCH_COMPILE_WORKERS": "threads"})


def test_tasks_reach_a_worker_unchanged():
    from unsloth_patch.kernels import warmup as kw

    specs = [kw.AttentionSpec(4, 2, 64, torch.bfloat16, 8, 30.0), kw.NormSpec(96, torch.float16, torch.float32, 1.0),
             kw.GatedSpec(torch.bfloat16, gelu=True), kw.RopeSpec(6, 1, 80, torch.bfloat16, torch.float32)]
    tasks = kw.tasks_of(specs)
    assert len(tasks) == 4 + 2 + 1 + 1
    assert [kw.decode_task(json.loads(json.dumps(kw.encode_task(t)))) for t in tasks] == tasks
    with pytest.raises(ValueError, match="unknown warm-up spec kind 'Conv'"):
        kw.decode_task({"kind": "Conv", "fields": {}, "launch": "x"})
    with pytest.raises(ValueError, match="unknown launch '_gelu' for GatedSpec"):
        kw.decode_task({"kind": "GatedSpec", "fields": {"dtype": "float32"}, "launch": "_gelu"})
    with pytest.raises(ValueError, match="dtype='float99' is not a torch dtype"):
        kw.decode_task({"kind": "GatedSpec", "fields": {"dtype": "float99"}, "launch": "_gated"})


def test_a_worker_process_runs_its_tasks_and_reports_failures(monkeypatch):
    pytest.importorskip("triton")
    from unsloth_patch.kernels import warmup as kw

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the CPU stands in for the GPU
    good = [kw.encode_task(t) for t in kw.tasks_of([kw.NormSpec(64, torch.float32, torch.float32),
                                                    kw.GatedSpec(torch.float32)])]
    bad = kw.encode_task(kw.tasks_of([kw.GatedSpec(torch.int64)])[0])  # random normals of int64 do not exist
    outcome = cw.compile_in_workers([good, [bad]], "cpu", timeout=300)
    assert outcome["workers"] == 2 and outcome["errors"] == []
    assert len(outcome["failed"]) == 1 and "GatedSpec" in outcome["failed"][0][0] and outcome["seconds"] > 0
    broken = cw.compile_in_workers([[{"kind": "Conv", "fields": {}, "launch": "x"}]], "cpu", timeout=300)
    assert broken["failed"] == [] and len(broken["errors"]) == 1 and "unknown warm-up spec kind" in broken["errors"][0]


def test_a_worker_is_the_plugin_switched_off_and_finds_this_package():
    env = cw.worker_environment({"PYTHONPATH": "/elsewhere", "TRITON_CACHE_DIR": "/tmp/tc"})
    assert env["UNSLOTH_PATCH_DISABLE"] == "1" and env["TRITON_CACHE_DIR"] == "/tmp/tc"
    code = "import unsloth_patch, sys; print(unsloth_patch.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PATH": "/usr/bin:/bin"}, cwd="/",
                         capture_output=True, text=True, check=True).stdout
    import unsloth_patch

    assert out.strip() == unsloth_patch.__file__


def test_the_start_up_report_says_where_the_kernels_compiled():
    from unsloth_patch import startup, warmup

    workers = {"chosen": 6, "reason": "6 worker processes", "seconds": 2.5, "errors": ["worker 7: exit 1"]}
    line = warmup.describe({"seconds": 3.25, "specs": 4, "failed": [], "workers": workers,
                            "tasks": {"TRL fused LM head": {}}})
    assert line == "4 variants in 3.25 s on 6 worker processes (2.50 s), 1 worker error(s), 1 task(s) of TRL's"
    threads = warmup.describe({"seconds": 1.0, "specs": 2, "failed": [("spec", "boom")],
                               "workers": {"chosen": 0, "reason": "compile on threads in the training process"}})
    assert threads == "2 variants in 1.00 s on threads (compile on threads in the training process), 1 failed"
    assert warmup.describe(None) == "none"
    startup.begin()
    with startup.phase("waiting for kernel compilation"):
        pass
    startup.note("kernel warm-up", line)
    summary = startup.train_started(0.0)
    assert summary["notes"] == {"kernel warm-up": line} and "waiting for kernel compilation" in summary["phases"]
    startup.begin()
    assert "notes" not in startup.train_started(0.0)
