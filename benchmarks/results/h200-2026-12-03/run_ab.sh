#!/bin/bash
# call 2 of 2026-12-03: this working tree (TRL fused-head warm-up, gc freeze) against HEAD (.dev/base), and stock
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
R=$OUT/res; mkdir -p $R
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
F="grep -E ^==|whole|Error|error"
$B --configs stock --first-repeat 1 2>&1 | grep -E "^==|whole|rror" | head -4
for i in 1 2 3; do
  $B --configs unsloth_patch --tag=-new --first-repeat $i 2>&1 | grep -E "^==|whole|rror" | head -4
  $B --configs unsloth_patch --tag=-base --first-repeat $i --patch-path .dev/base 2>&1 | grep -E "^==|whole|rror" | head -4
done
$B --configs stock --first-repeat 2 2>&1 | grep -E "^==|whole|rror" | head -4
$B --configs unsloth_patch --tag=-new --first-repeat 4 2>&1 | grep -E "^==|whole|rror" | head -4
tar czf $OUT/res.tgz -C $OUT res card.txt
