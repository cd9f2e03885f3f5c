#!/bin/bash
# (.dev/ held the call's helpers: .dev/base = `git archive 86eba1b unsloth_patch`, .dev/micro.py and .dev/memtrace2.py = micro.py and memtrace.py here)
# call 1 of the third session of 2026-12-03: Triton's compile key primed at TRL import (new) against 86eba1b (base)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
python3 .dev/micro.py; python3 .dev/micro.py
python3 -m pytest -q -p no:cacheprovider tests/test_compile_key.py 2>&1 | tail -2
R=$OUT/res; mkdir -p $R
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
n() { $B --configs unsloth_patch --first-repeat $1 "${@:2}" 2>&1 | grep -E "^==|whole|rror" | head -5; }
for i in 1 2 3; do
  n $i --tag=-new $([ $i = 1 ] && echo --warm)
  n $i --tag=-base --patch-path .dev/base $([ $i = 1 ] && echo --warm)
  grep -ho '"kernel warm-up": "[^"]*"' $R/llama-new-unsloth_patch-cold*.json | tail -1
done
$B --configs stock 2>&1 | grep -E "^==|whole|rror" | head -3
tar czf $OUT/res.tgz -C $OUT res card.txt
