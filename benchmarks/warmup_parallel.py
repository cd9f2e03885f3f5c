"""How long the kernel warm-up takes on a cold Triton cache: serially, on threads, in processes.

Each mode runs in a fresh process with its own empty ``TRITON_CACHE_DIR``, for the kernel variants
the reference workload compiles (``unsloth_patch.warmup.specs_for`` of the Llama-shaped 1.1B config
or ``--model qwen3``, bf16). ``serial``: one launch after another; ``threads``: what the plugin does,
a thread per launch, forward and backward kernels apart (useful because Triton's compiler spends
much of its time outside the GIL). ``processes``: one process per variant compiles into the shared cache, then the
parent launches every variant (now cache hits); the time includes the processes' start-up.

    python benchmarks/warmup_parallel.py [--model llama|qwen3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import os, sys, time, json
started = time.perf_counter()
import torch
from unsloth_patch import tiny, settings
from unsloth_patch.warmup import specs_for
from unsloth_patch.kernels.warmup import warm_up
mode, model, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = {"llama": tiny.build_llama_1b_config, "qwen3": tiny.build_qwen3_1b_config}[model]()
specs = specs_for(config, torch.bfloat16, torch.bfloat16, settings.current())
device = torch.device("cuda", 0)
torch.zeros(1, device=device)
imported = time.perf_counter()
if mode == "one":
    warm_up([specs[index]], device)
elif mode == "threads":  # the plugin's own way: a thread per launch (forward and backward apart)
    warm_up(specs, device)
elif mode == "timed":  # serially, each launch timed on its own: where the compile time goes
    from unsloth_patch.kernels.warmup import _LAUNCHES
    each = []
    for spec in specs:
        for launch in _LAUNCHES[type(spec)]:
            t0 = time.perf_counter()
            launch(spec, device)
            torch.cuda.synchronize()
            each.append([type(spec).__name__, launch.__name__, time.perf_counter() - t0])
    print(json.dumps({"specs": len(specs), "import_s": imported - started, "warmup_s": time.perf_counter() - imported,
                      "launches": each}))
    sys.exit(0)
else:
    warm_up(specs, device, parallel=False)
torch.cuda.synchronize()
print(json.dumps({"specs": len(specs), "import_s": imported - started, "warmup_s": time.perf_counter() - imported}))
"""


def _child(mode, model, index, cache):
    env = dict(os.environ, TRITON_CACHE_DIR=cache, PYTHONPATH=os.pathsep.join(
        p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p))
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, model, str(index)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(err[-3000:])
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", choices=["llama", "qwen3"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--modes", default="serial,threads,timed,processes",
                        help="comma-separated: serial, threads, timed (each launch timed serially), processes")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    results = {}
    for mode in [m for m in ("serial", "threads", "timed") if m in modes]:
        started = time.perf_counter()
        r = _result(_child(mode, args.model, 0, tempfile.mkdtemp(prefix=f"triton-{mode}-")))
        results[mode] = dict(r, wall_s=time.perf_counter() - started)
    if "processes" in modes:
        cache = tempfile.mkdtemp(prefix="triton-processes-")
        started = time.perf_counter()
        if not results:
            raise SystemExit("processes needs another mode first (it takes the variant count from it)")
        count = next(iter(results.values()))["specs"]
        children = [_child("one", args.model, i, cache) for i in range(count)]
        for child in children:
            _result(child)
        parent = _result(_child("serial", args.model, 0, cache))
        results["processes"] = dict(parent, wall_s=time.perf_counter() - started)
        # what a training process would wait: everything but the parent's own imports (it has them already)
        results["processes"]["warmup_s"] = results["processes"]["wall_s"] - parent["import_s"]
    for mode, r in results.items():
        print(f"{mode:9s} warm-up {r['warmup_s']:.2f}s (process wall {r['wall_s']:.2f}s, import {r['import_s']:.2f}s, "
              f"{r['specs']} variants)")
        for spec, launch, seconds in r.get("launches", []):
            print(f"          {spec:13s} {launch:26s} {seconds:.2f}s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
