#!/bin/bash
# Prepared in the second session of 2026-12-07, NOT RUN (no device time left): issue 14's "what the default policy does
# on 16, 24, 40 and 80 GB cards", simulated by the budget the default would give such a card (90% of it). Full FT, LoRA
# and QLoRA on the reference workload, each a fresh process. Carry: .whl, benchmarks/out/data.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=/tmp/resD; mkdir -p $R
save() { tar czf $OUT/resD.tgz --exclude='ckpt-*' -C /tmp resD; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 10; do save; done) &
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
S='^==|whole|rror|FAILED|skipped'
for card in 16 24 40; do
  budget=$(python3 -c "print(round(0.9 * $card * 1e9 / 2**30, 2))")
  for config in unsloth_patch unsloth_patch_lora unsloth_patch_qlora; do
    UNSLOTH_PATCH_MEMORY_BUDGET_GB=$budget $B --configs $config --tag=-card$card 2>&1 | grep --line-buffered -E "$S"
  done
done
save
