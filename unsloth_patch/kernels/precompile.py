"""A compile worker: ``python -m unsloth_patch.kernels.precompile JOB`` (JOB: a JSON text).

Triton compiles a kernel partly under the GIL (its Python front end), so compile threads in the
training process take turns with each other and with TRL's dataset preparation. A worker process
has a GIL of its own: it launches its share of the warm-up's tasks on tiny inputs, Triton writes
the compiled kernels to its on-disk cache, and the training process's own warm-up then loads
them from there instead of compiling. The job: ``{"device": "cuda:0", "tasks": [encode_task(...)]}``.
The worker prints one JSON line, ``{"seconds": s, "failed": [[task, error], ...]}``; it exits 0
unless the job itself could not be read (nothing it does is needed for correctness: a task it did
not compile is compiled by the training process as before).
"""

from __future__ import annotations

import json
import sys
import time


def run_job(job: dict) -> dict:
    import torch

    from . import warmup

    started = time.perf_counter()
    device = torch.device(job["device"])
    tasks = [warmup.decode_task(task) for task in job["tasks"]]
    failed = warmup.run_tasks(tasks, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"seconds": time.perf_counter() - started, "failed": [[str(spec), error] for spec, error in failed]}


def main() -> int:
    try:
        job = json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    except ValueError as exc:
        print(json.dumps({"error": f"job is not JSON: {exc}"}))
        return 2
    print(json.dumps(run_job(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
