#!/bin/bash
# call 3 of 2026-12-04 (.dev/base = `git archive e0ae0a6 unsloth_patch`): the check again (loss on a fixed projection of
# the last hidden states), then LoRA r=16 under four policies, each chosen by a budget: this build's mlp_recompute
# (3.9 GiB) and offload (3.5: pinned pool, prefetch, MLPs recomputed), e0ae0a6's full (3.5) and offload (4.1)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=$OUT/res; mkdir -p $R
python3 benchmarks/mlp_recompute_check.py --out $R/check.json --repeats 5 2>&1 | grep -v Warn | tail -4
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --configs unsloth_patch_lora"
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.9 $B --tag=-budget3.9 2>&1 | grep -E "^==|whole|rror" | head -3
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.5 $B --tag=-budget3.5 2>&1 | grep -E "^==|whole|rror" | head -3
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.5 $B --tag=-budget3.5-e0ae0a6 --patch-path .dev/base 2>&1 | grep -E "^==|whole|rror" | head -3
UNSLOTH_PATCH_MEMORY_BUDGET_GB=4.1 $B --tag=-budget4.1-e0ae0a6 --patch-path .dev/base 2>&1 | grep -E "^==|whole|rror" | head -3
tar czf $OUT/res.tgz -C $OUT res
