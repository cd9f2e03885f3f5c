#!/bin/bash
# call 1 of 2026-12-04: the mlp_recompute check (loss/gradients/peak/step time against full checkpointing, 4 layers)
# and LoRA at a 3.5 GiB budget with and without mlp_recompute (UNSLOTH_PATCH_KERNELS_OFF=mlp_recompute: the build before)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
python3 benchmarks/mlp_recompute_check.py --out $R/check.json 2>&1 | grep -v Warn | tail -4
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --configs unsloth_patch_lora"
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.5 $B --tag=-budget3.5 2>&1 | grep -E "^==|whole|rror" | head -3
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.5 UNSLOTH_PATCH_KERNELS_OFF=mlp_recompute $B --tag=-budget3.5-off 2>&1 | grep -E "^==|whole|rror" | head -3
tar czf $OUT/res.tgz -C $OUT res
