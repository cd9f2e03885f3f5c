#!/bin/bash
# (.dev/ held the call's helpers: .dev/base = `git archive 86eba1b unsloth_patch`, .dev/micro.py and .dev/memtrace2.py = micro.py and memtrace.py here)
# call 4 of the third session of 2026-12-03: LoRA inputs kept in the compute dtype (new) against the same build
# with UNSLOTH_PATCH_KERNELS_OFF=lora_cast (PEFT's casts), at a 3.4 GiB budget; and LoRA without a budget
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=$OUT/res; mkdir -p $R
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --configs unsloth_patch_lora"
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.4 $B --tag=-budget3.4 2>&1 | grep -E "^==|whole|rror" | head -3
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.4 UNSLOTH_PATCH_KERNELS_OFF=lora_cast $B --tag=-budget3.4-castoff 2>&1 | grep -E "^==|whole|rror" | head -3
$B 2>&1 | grep -E "^==|whole|rror" | head -3
tar czf $OUT/res.tgz -C $OUT res
