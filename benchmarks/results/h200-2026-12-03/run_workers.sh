#!/bin/bash
# call 1 of 2026-12-03 (second session): kernel warm-up in worker processes (this tree) against HEAD d25caf1 (.dev/base: threads), and stock, interleaved
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
nproc >> $OUT/card.txt
python3 -c "import torch, transformers, trl, datasets; torch.zeros(1).cuda(); print('page cache warm')"
for m in off auto off auto; do TRITON_CACHE_DIR=$(mktemp -d) UNSLOTH_PATCH_COMPILE_WORKERS=$m python3 .dev/warm_only.py 2>&1 | grep -E "WARM|rror" | head -3; done
R=$OUT/res; mkdir -p $R
B="python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R"
b() { $B --configs unsloth_patch --tag=-base --first-repeat $1 --patch-path .dev/base 2>&1 | grep -E "^==|whole|rror" | head -3; }
n() { $B --configs unsloth_patch --tag=-new --first-repeat $1 2>&1 | grep -E "^==|whole|rror|warm-up" | head -4; }
s() { $B --configs stock --first-repeat $1 2>&1 | grep -E "^==|whole|rror" | head -3; }
n 1; b 1; s 1; n 2; b 2; n 3; s 2; b 3
tar czf $OUT/res.tgz -C $OUT res card.txt
