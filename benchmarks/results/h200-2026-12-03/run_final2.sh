#!/bin/bash
# call 2 of the second session of 2026-12-03: the build as committed (threads warm-up, start-up note), cold + warm,
# full checkpointing through a 10 GiB budget, and stock, interleaved
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
python3 -c "import torch, transformers, trl, datasets; torch.zeros(1).cuda(); print('page cache warm')"
R=$OUT/res; mkdir -p $R
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
s() { $B --configs stock --first-repeat $1 2>&1 | grep -E "^==|whole|rror" | head -3; }
n() { $B --configs unsloth_patch --first-repeat $1 "${@:2}" 2>&1 | grep -E "^==|whole|rror" | head -5; }
s 1; n 1 --warm; UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 n 1 --tag=-budget10; n 2; s 2; UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 n 2 --tag=-budget10; n 3
tar czf $OUT/res.tgz -C $OUT res card.txt
