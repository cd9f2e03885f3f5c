#!/bin/bash
# call 5 of 2026-12-04 (sent twice: the first machine stopped answering), right after call 4 (bitsandbytes into
# /tmp/peers, benchmarks/README.md "Call 1"), same machine: Unsloth 2026.10.9 LoRA, then this build with
# UNSLOTH_PATCH_MEMORY_BUDGET_GB = Unsloth's measured peak (memory-matched), the same for full fine-tuning
test -d /tmp/peers/bitsandbytes || { echo 'bitsandbytes missing: the machine went cold'; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --peer-path /tmp/peers"
$B --configs unsloth_lora,unsloth_patch_lora_budget,unsloth,unsloth_patch_budget 2>&1 | grep -E "^==|whole|rror|skipped" | head -12
