#!/bin/bash
# call 1 of 2026-12-03: why this build's steady state varies (new default / previous build / new with the probe forced)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
R=$OUT/res; mkdir -p $R
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --configs unsloth_patch"
for i in 1 2 3 4; do
  $B --tag=-new --first-repeat $i 2>&1 | grep -E "^==|whole|Error|error" | head -5
  if [ $i -le 3 ]; then
    $B --tag=-old --first-repeat $i --patch-path .dev/old 2>&1 | grep -E "^==|whole|Error|error" | head -5
    UNSLOTH_PATCH_MEMORY_BUDGET_GB=60 $B --tag=-probe --first-repeat $i 2>&1 | grep -E "^==|whole|Error|error" | head -5
  fi
done
tar czf $OUT/res.tgz -C $OUT res card.txt
