#!/bin/bash
# (.dev/ held the call's helpers: .dev/base = `git archive 86eba1b unsloth_patch`, .dev/micro.py and .dev/memtrace2.py = micro.py and memtrace.py here)
# call 3 of the third session of 2026-12-03: what is live at train()'s peak, LoRA at a 3.4 GiB budget (full data)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=$OUT/res; mkdir -p $R
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.4 TRITON_CACHE_DIR=$(mktemp -d) timeout 300 python3 .dev/memtrace2.py unsloth_patch_lora $R/mem2-lora-budget3.4.json 2>&1 | grep -E "^TRACE|^  |rror" | head -40
tar czf $OUT/res.tgz -C $OUT res
