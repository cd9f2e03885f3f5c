#!/bin/bash
# Prepared in the second session of 2026-12-04; not run there (the device machine stopped answering
# and no other was lent). Carry: .whl, .whl-peers-a (bitsandbytes), benchmarks/out/data, .dev
# (.dev/base = `git archive bb7cb82 unsloth_patch`, the build before the fused LoRA layers).
# 1. benchmarks/lora_fusion_check.py: fused LoRA layers against PEFT's, bf16 vs fp32, step time, launches
# 2. the reference LoRA and QLoRA workloads, this build (fused LoRA layers on, and off) against bb7cb82, no budget
#    and at 3.37 GiB
# 3. a profile of this build's LoRA step
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-peers-a/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
python3 benchmarks/lora_fusion_check.py --out $R/check.json 2>&1 | grep -v Warn | tail -40
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
for c in unsloth_patch_lora unsloth_patch_qlora; do
  $B --configs $c --tag=-new 2>&1 | grep -E "^==|whole|rror" | head -3
  UNSLOTH_PATCH_KERNELS_OFF=lora $B --configs $c --tag=-new-lora-off 2>&1 | grep -E "^==|whole|rror" | head -3
  $B --configs $c --tag=-base --patch-path .dev/base 2>&1 | grep -E "^==|whole|rror" | head -3
done
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.37 $B --configs unsloth_patch_lora --tag=-new-3.37 2>&1 | grep -E "^==|whole|rror" | head -3
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.37 $B --configs unsloth_patch_lora --tag=-base-3.37 --patch-path .dev/base 2>&1 | grep -E "^==|whole|rror" | head -3
python3 benchmarks/profile_step.py --config unsloth_patch_lora --data benchmarks/out/data --out $R/profile-new.json 2>&1 | tail -16
