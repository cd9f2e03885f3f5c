#!/bin/bash
# 2026-12-07 (second session), call A. Carry: .whl, .whl-peers-b, benchmarks/out/data.
# Full fine-tuning on the reference workload, in one call: Unsloth 2026.10.9,
# stock TRL, this build cold then warm (a new process with the cold run's Triton cache),
# this build at 10 GiB; then the fused LoRA layers on an nf4 base against PEFT's (bit-exactness, bf16 tolerances).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/resA; mkdir -p $R
save() { tar czf $OUT/resA.tgz --exclude='ckpt-*' -C /tmp resA; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 10; do save; done) &
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --peer-path /tmp/peers"
S='^==|whole|rror|FAILED|skipped'
$B --configs unsloth,stock 2>&1 | grep --line-buffered -E "$S"
$B --configs unsloth_patch --warm 2>&1 | grep --line-buffered -E "$S"
UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 $B --configs unsloth_patch --tag=-10gb 2>&1 | grep --line-buffered -E "$S"
python3 benchmarks/lora_fusion_check.py --quant nf4 --out $R/check-nf4.json > $R/check-nf4.log 2>&1; tail -c 1500 $R/check-nf4.log
save
