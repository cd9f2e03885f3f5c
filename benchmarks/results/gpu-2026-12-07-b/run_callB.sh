#!/bin/bash
# 2026-12-07 (second session), call B. Carry: .whl, .whl-peers-b, benchmarks/out/data.
# NOT RUN in the second session of 2026-12-07 (no device time left): prepared for the next one.
# LORA on the reference workload, one benchmark run, each row a fresh process with a cold Triton cache:
# Unsloth 2026.10.9, this build at Unsloth's measured peak (memory-matched), stock TRL + PEFT, this build
# without a budget (the user's default).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/resB; mkdir -p $R
save() { tar czf $OUT/resB.tgz --exclude='ckpt-*' -C /tmp resB; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 10; do save; done) &
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --peer-path /tmp/peers"
S='^==|whole|rror|FAILED|skipped'
$B --configs unsloth_lora,unsloth_patch_lora_budget,stock_lora,unsloth_patch_lora 2>&1 | grep --line-buffered -E "$S"
save
