#!/bin/bash
# call 3 of 2026-12-03: this working tree (TRL fused-head warm-up) against HEAD (.dev/base), and stock, interleaved
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
python3 -c "import torch, transformers, trl, datasets; torch.zeros(1).cuda(); print('page cache warm')"
R=$OUT/res; mkdir -p $R
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
b() { $B --configs unsloth_patch --tag=-base --first-repeat $1 --patch-path .dev/base 2>&1 | grep -E "^==|whole|rror" | head -3; }
n() { $B --configs unsloth_patch --tag=-new --first-repeat $1 2>&1 | grep -E "^==|whole|rror" | head -3; }
s() { $B --configs stock --first-repeat $1 2>&1 | grep -E "^==|whole|rror" | head -3; }
b 1; n 1; s 1; n 2; b 2; n 3; s 2; b 3
tar czf $OUT/res.tgz -C $OUT res card.txt
