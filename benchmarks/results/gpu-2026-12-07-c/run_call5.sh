#!/bin/bash
# 2026-12-07 (third session), call 5. Carry: .whl, .whl-peers-b, benchmarks/out/data, benchmarks/out/snap5
# (`git archive` of the commit under test). The session's last 230 s of device time: an A/B of the MLP chunk
# sizing on QLoRA at Unsloth's measured peak (2.09 GiB in call 3), both rows with the 4-bit scales kept:
# UNSLOTH_PATCH_KERNELS_OFF=mlp_chunk (the probed 2048-token chunks) first, then the chunks sized from the room.
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
cd benchmarks/out/snap5 && git -C $ROOT log -1 --format=%h > /tmp/commit.txt 2>/dev/null; cat COMMIT 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/res5; mkdir -p $R
save() { tar czf $OUT/res5.tgz --exclude='ckpt-*' -C /tmp res5; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 10; do save; done) &
B="python3 benchmarks/sft.py all --model llama --data $ROOT/benchmarks/out/data --out $R "
S='^==|whole|rror|FAILED|skipped'
UNSLOTH_PATCH_KERNELS_OFF=mlp_chunk UNSLOTH_PATCH_MEMORY_BUDGET_GB=2.09 $B --configs unsloth_patch_qlora --tag=-2.09gb-chunkoff 2>&1 | grep --line-buffered -E "$S"
save
UNSLOTH_PATCH_MEMORY_BUDGET_GB=2.09 $B --configs unsloth_patch_qlora --tag=-2.09gb 2>&1 | grep --line-buffered -E "$S"
save
