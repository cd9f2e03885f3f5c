# the warm-up alone, as run in call 1 of the second session of 2026-12-03 (the worker build's _run took settings)
import time, torch, unsloth_patch
from unsloth_patch import warmup, tiny
from unsloth_patch.settings import current
t0 = time.perf_counter()
cfg = tiny.build_llama_1b_config()
specs = warmup.specs_for(cfg, torch.bfloat16, torch.bfloat16, current())
torch.zeros(1, device="cuda")
t1 = time.perf_counter()
warmup._run(specs, torch.device("cuda", 0), current())
print("WARM", current().compile_workers, f"{time.perf_counter()-t1:.2f}s", warmup.describe(warmup._outcome), warmup._outcome.get("workers", {}).get("errors"), warmup._outcome.get("failed"))
