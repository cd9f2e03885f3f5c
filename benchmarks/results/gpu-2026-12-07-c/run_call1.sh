#!/bin/bash
# 2026-12-07 (third session), call 1. Carry: .whl, .whl-peers-b, benchmarks/out/data, benchmarks/out/snap
# (benchmarks/out/snap = `git archive` of the commit under test, so that edits in the workspace during the
# call cannot reach it). LoRA and QLoRA on the reference workload, one benchmark run, each row a fresh
# process with a cold Triton cache: Unsloth 16-bit LoRA, this build at Unsloth LoRA's measured peak,
# stock TRL + PEFT LoRA, this build LoRA (user's default), stock TRL + PEFT QLoRA, this build QLoRA
# (user's default; the 4-bit bound replaces the probe since the second session).
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl
cd benchmarks/out/snap && git -C $ROOT log -1 --format=%h > /tmp/commit.txt 2>/dev/null; cat COMMIT 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/res1; mkdir -p $R
save() { tar czf $OUT/res1.tgz --exclude='ckpt-*' -C /tmp res1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 10; do save; done) &
B="python3 benchmarks/sft.py all --model llama --data $ROOT/benchmarks/out/data --out $R --peer-path /tmp/peers"
S='^==|whole|rror|FAILED|skipped'
$B --configs unsloth_lora,unsloth_patch_lora_budget,stock_lora,unsloth_patch_lora,stock_qlora,unsloth_patch_qlora 2>&1 | grep --line-buffered -E "$S"
save
