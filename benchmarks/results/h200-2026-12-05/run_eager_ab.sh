#!/bin/bash
# Prepared on 2026-12-05; not run (no device machine was lent that day). Carry: .whl (../shared/gpu-wheels.sh),
# benchmarks/out/data (`python benchmarks/sft.py prepare --out benchmarks/out/data --limit 1000`), .dev
# (.dev/base-op = `git archive c119cd5 unsloth_patch`: every kernel call through its torch.library op).
# The eager-dispatch change (kernels/_eager.py), A/B on the reference workload, fresh processes, alternating
# builds, two runs each (medians), no budget (policy none) and at 10 GiB (full checkpointing or better).
# Prediction (docs/kernel-notes.md): +4-7% steady tokens/s; device time unchanged.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
for round in 1 2; do
  $B --configs unsloth_patch --tag=-eager-r$round 2>&1 | grep -E "^==|whole|rror" | head -3
  $B --configs unsloth_patch --tag=-op-r$round --patch-path .dev/base-op 2>&1 | grep -E "^==|whole|rror" | head -3
  UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 $B --configs unsloth_patch --tag=-eager-10gb-r$round 2>&1 | grep -E "^==|whole|rror" | head -3
  UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 $B --configs unsloth_patch --tag=-op-10gb-r$round --patch-path .dev/base-op 2>&1 | grep -E "^==|whole|rror" | head -3
done
