#!/bin/bash
# call 5 of 2026-12-04, right after call 4 (bitsandbytes into /tmp/peers, benchmarks/README.md "Call 1"), same machine:
# Unsloth 2026.10.9 LoRA and full fine-tuning, then this build and e0ae0a6 (.dev/base) with
# UNSLOTH_PATCH_MEMORY_BUDGET_GB = Unsloth's measured peak (memory-matched rows)
test -d /tmp/peers/bitsandbytes || { echo 'bitsandbytes missing: the machine went cold'; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --peer-path /tmp/peers"
$B --configs unsloth_lora,unsloth_patch_lora_budget,unsloth,unsloth_patch_budget 2>&1 | grep -E "^==|whole|rror|skipped" | head -12
peak() { python3 -c "import json,sys; print(f\"{json.load(open(sys.argv[1]))['peak_gib']:.3f}\")" $1; }
UNSLOTH_PATCH_MEMORY_BUDGET_GB=$(peak $R/llama-unsloth_lora-cold.json) $B --configs unsloth_patch_lora --tag=-matched-e0ae0a6 --patch-path .dev/base 2>&1 | grep -E "^==|whole|rror" | head -3
UNSLOTH_PATCH_MEMORY_BUDGET_GB=$(peak $R/llama-unsloth-cold.json) $B --configs unsloth_patch --tag=-matched-e0ae0a6 --patch-path .dev/base 2>&1 | grep -E "^==|whole|rror" | head -3
tar czf $OUT/res.tgz -C $OUT res
