#!/bin/bash
# 2026-12-07, call 2. Carry: .whl, .whl-peers-b, benchmarks/out/data (as call 1).
# Full fine-tuning on the reference workload: Unsloth 2026.10.9, this build at Unsloth's measured peak
# (memory-matched) and at 10 GiB, stock TRL, this build cold then warm (a new process with the cold run's
# Triton cache); then the fused LoRA layers on an nf4 base against PEFT's (bit-exactness, bf16 tolerances);
# then the second family (Qwen3-shaped 1B): stock and this build. Each training run a fresh process.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/res2; mkdir -p $R
save() { tar czf $OUT/res2.tgz -C /tmp res2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 15; do save; done) &
B="python3 benchmarks/sft.py all --data benchmarks/out/data --out $R --peer-path /tmp/peers"
S='^==|whole|rror|FAILED|skipped'
$B --model llama --configs unsloth,unsloth_patch_budget,stock 2>&1 | grep -E "$S" | head -12
UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 $B --model llama --configs unsloth_patch --tag=-10gb 2>&1 | grep -E "$S" | head -4
$B --model llama --configs unsloth_patch --warm 2>&1 | grep -E "$S" | head -6
python3 benchmarks/lora_fusion_check.py --quant nf4 --out $R/check-nf4.json 2>&1 | grep -E '"(loss|loss_rel_error|grad_rel_l2_median|grad_rel_l2_max|step_ms|speedup|layers|weights_bit_equal|base_outputs_bit_equal)"|rror' | head -24
save
$B --model qwen3 --configs stock,unsloth_patch 2>&1 | grep -E "$S" | head -6
save
