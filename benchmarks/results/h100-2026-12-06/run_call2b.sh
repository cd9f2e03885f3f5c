#!/bin/bash
# 2026-12-06, call 2 as run (run_call2.sh, the full LoRA + QLoRA comparison, needed more device time than was
# left). Same warm H100 machine as call 1, right after it. Carry: .whl, .whl-peers-b, benchmarks/out/data.
# LoRA r=16: Unsloth 2026.10.9, this build with the budget set to Unsloth's measured peak, stock TRL.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/res2; mkdir -p $R
(while sleep 15; do tar czf $OUT/res2.tgz -C /tmp res2; done) &
python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --peer-path /tmp/peers \
  --configs unsloth_lora,unsloth_patch_lora_budget,stock_lora 2>&1 | grep -E '^==|whole|FAILED|skipped'
tar czf $OUT/res2.tgz -C /tmp res2
