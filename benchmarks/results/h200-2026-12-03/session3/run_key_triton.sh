#!/bin/bash
# (.dev/ held the call's helpers: .dev/base = `git archive 86eba1b unsloth_patch`, .dev/micro.py and .dev/memtrace2.py = micro.py and memtrace.py here)
# call 2 of the third session of 2026-12-03: compile key primed at Triton's import (new) against 86eba1b (base),
# cold + warm, interleaved; then what is live at the peak of LoRA at a 3.4 GiB budget and of stock LoRA
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -c "import time,sys; t=time.perf_counter(); import torch; print('torch imports triton:', 'triton' in sys.modules, round(time.perf_counter()-t,2))"
R=$OUT/res; mkdir -p $R
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
n() { $B --configs unsloth_patch --first-repeat $1 "${@:2}" 2>&1 | grep -E "^==|whole|rror" | head -5; }
for i in 1 2 3; do
  n $i --tag=-new $([ $i -le 2 ] && echo --warm)
  n $i --tag=-base --patch-path .dev/base $([ $i -le 2 ] && echo --warm)
done
grep -ho '"kernel warm-up": "[^"]*"' $R/llama-new-*.json
m() { TRITON_CACHE_DIR=$(mktemp -d) timeout 150 python3 .dev/memtrace.py $1 $R/mem-$1$2.json --min-tokens 150000 2>&1 | grep -E "^TRACE|^  |rror" | head -40; }
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.4 m unsloth_patch_lora -budget3.4
UNSLOTH_PATCH_DISABLE=1 m stock_lora
tar czf $OUT/res.tgz -C $OUT res
