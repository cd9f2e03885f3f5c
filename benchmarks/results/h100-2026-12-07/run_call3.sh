#!/bin/bash
# 2026-12-07, call 3: what the session's last ~350 s of device time could hold (call 2 was never started: no
# machine could be had). Carry: .whl, .whl-peers-b, benchmarks/out/data. Full fine-tuning on the reference
# workload: Unsloth 2026.10.9 and this build at Unsloth's measured peak (memory-matched), then this build without a
# budget, cold then warm; each a fresh process.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/res3; mkdir -p $R
save() { tar czf $OUT/res3.tgz --exclude='ckpt-*' -C /tmp res3; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 5; do save; done) &
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --peer-path /tmp/peers"
S='^==|whole|rror|FAILED|skipped'
$B --configs unsloth,unsloth_patch_budget 2>&1 | grep --line-buffered -E "$S"
$B --configs unsloth_patch --warm 2>&1 | grep --line-buffered -E "$S"
save
