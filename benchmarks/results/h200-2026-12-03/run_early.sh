#!/bin/bash
# call 4 of 2026-12-03: warm-up begun at model load (this tree) against b7ffc0b (.dev/prev: at SFTTrainer), and stock
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
python3 -c "import torch, transformers, trl, datasets; torch.zeros(1).cuda(); print('page cache warm')"
R=$OUT/res; mkdir -p $R
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
p() { $B --configs unsloth_patch --tag=-prev --first-repeat $1 --patch-path .dev/prev 2>&1 | grep -E "^==|whole|rror" | head -3; }
n() { $B --configs unsloth_patch --tag=-new --first-repeat $1 2>&1 | grep -E "^==|whole|rror" | head -3; }
s() { $B --configs stock --first-repeat $1 2>&1 | grep -E "^==|whole|rror" | head -3; }
n 1; p 1; s 1; n 2; n 3
tar czf $OUT/res.tgz -C $OUT res card.txt
