#!/bin/bash
# 2026-12-07, call 4: the last ~250 s of the session's device time (calls 2 and 3 could not start). Carry: .whl,
# benchmarks/out/data. This build on the reference workload (full fine-tuning), cold then warm (a new process with
# the cold run's Triton cache), then at a 10 GiB budget (the probe runs); each a fresh process. No peer fits in the
# time: only ratios within a run (whole / steady, start-up) are read from this call.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=/tmp/res4; mkdir -p $R
save() { tar czf $OUT/res4.tgz --exclude='ckpt-*' -C /tmp res4; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 5; do save; done) &
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
S='^==|whole|rror|FAILED|skipped'
$B --configs unsloth_patch --warm 2>&1 | grep --line-buffered -E "$S"
UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 $B --configs unsloth_patch --tag=-10gb 2>&1 | grep --line-buffered -E "$S"
save
