#!/bin/bash
# Prepared in the second session of 2026-12-04; not run. Call B of a pair, right after run_call2.sh (carry .whl,
# .whl-peers-b, benchmarks/out/data): LoRA r=16 for stock TRL, Unsloth 2026.10.9 and this build, the budget row set to
# Unsloth's measured peak (memory-matched), each in a fresh process, in one call.
test -d /tmp/peers/bitsandbytes || { echo 'bitsandbytes missing: the machine went cold'; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --peer-path /tmp/peers"
$B --configs stock_lora,unsloth_lora,unsloth_patch_lora_budget,unsloth_patch_lora 2>&1 | grep -E "^==|whole|rror|skipped" | head -16
