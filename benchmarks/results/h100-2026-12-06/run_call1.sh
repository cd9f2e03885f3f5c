#!/bin/bash
# 2026-12-06, call 1 (ran on an NVIDIA H100 80GB HBM3: the H200 asked for could not be had). Carry: .whl (../shared/gpu-wheels.sh + bitsandbytes 0.50.2 with only its CUDA 13.0
# library kept, to fit the 64 MiB a call carries), benchmarks/out/data, .dev (.dev/base-op = `git archive
# c119cd5 unsloth_patch`: every kernel call through its torch.library op; .dev/base-head = `git archive 473c7aa
# unsloth_patch`: the build before the warm-up wait's gc.freeze).
# 1. benchmarks/lora_fusion_check.py: fused LoRA layers against PEFT's, bf16 vs fp32 (first GPU run of them)
# 2. LoRA and QLoRA reference workloads, fused LoRA layers on and off (UNSLOTH_PATCH_KERNELS_OFF=lora)
# 3. full FT: this build, 473c7aa (no gc.freeze while waiting) and c119cd5 (kernels through their ops), no
#    budget; this build and c119cd5 at 10 GiB; stock TRL once
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=/tmp/res; mkdir -p $R
save() { tar czf $OUT/res.tgz -C /tmp res; }  # at most 8 files come back: one archive, renewed after each run
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
python3 benchmarks/lora_fusion_check.py --out $R/check.json 2>&1 | grep -v Warn | grep -E "loss|grad|step_ms|launch|speedup|rror" | head -30; save
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
S='^==|whole|rror|FAILED'
for c in unsloth_patch_lora unsloth_patch_qlora; do
  $B --configs $c --tag=-new 2>&1 | grep -E "$S" | head -4; save
  UNSLOTH_PATCH_KERNELS_OFF=lora $B --configs $c --tag=-lora-off 2>&1 | grep -E "$S" | head -4; save
done
$B --configs unsloth_patch --tag=-eager 2>&1 | grep -E "$S" | head -4; save
$B --configs unsloth_patch --tag=-head --patch-path .dev/base-head 2>&1 | grep -E "$S" | head -4; save
$B --configs unsloth_patch --tag=-op --patch-path .dev/base-op 2>&1 | grep -E "$S" | head -4; save
$B --configs stock 2>&1 | grep -E "$S" | head -4; save
UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 $B --configs unsloth_patch --tag=-eager-10gb 2>&1 | grep -E "$S" | head -4; save
UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 $B --configs unsloth_patch --tag=-op-10gb --patch-path .dev/base-op 2>&1 | grep -E "$S" | head -4; save
