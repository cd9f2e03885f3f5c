#!/bin/bash
# 2026-12-07 (third session), call 2. Carry: .whl, .whl-peers-b, benchmarks/out/data, benchmarks/out/snap
# (benchmarks/out/snap = `git archive` of the commit under test, so that edits in the workspace during the
# call cannot reach it). The second family: Qwen3-shaped 0.94B, full fine-tuning on the reference data,
# one benchmark run, each row a fresh process with a cold Triton cache: Unsloth, this build at Unsloth's
# measured peak, stock TRL, this build (user's default).
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl
cd benchmarks/out/snap && git -C $ROOT log -1 --format=%h > /tmp/commit.txt 2>/dev/null; cat COMMIT 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/res2; mkdir -p $R
save() { tar czf $OUT/res2.tgz --exclude='ckpt-*' -C /tmp res2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 10; do save; done) &
B="python3 benchmarks/sft.py all --data $ROOT/benchmarks/out/data --out $R --peer-path /tmp/peers"
S='^==|whole|rror|FAILED|skipped'
$B --model qwen3 --configs unsloth,unsloth_patch_budget,stock,unsloth_patch 2>&1 | grep --line-buffered -E "$S"
save
