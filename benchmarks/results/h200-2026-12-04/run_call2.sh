#!/bin/bash
# call 2 of 2026-12-04 (.dev/base = `git archive e0ae0a6 unsloth_patch`, the build before this work):
# the mlp_recompute/offload check against full checkpointing and an fp32 reference (4 Llama-1B layers, 12,288 tokens),
# then LoRA r=16 at a 3.5 GiB budget, this build against e0ae0a6, interleaved
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
python3 benchmarks/mlp_recompute_check.py --out $R/check.json 2>&1 | grep -v Warn | tail -4
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --configs unsloth_patch_lora"
export UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.5
$B --tag=-budget3.5 2>&1 | grep -E "^==|whole|rror" | head -3
$B --tag=-budget3.5-e0ae0a6 --patch-path .dev/base 2>&1 | grep -E "^==|whole|rror" | head -3
$B --tag=-budget3.5 --first-repeat 2 2>&1 | grep -E "^==|whole|rror" | head -3
tar czf $OUT/res.tgz -C $OUT res
