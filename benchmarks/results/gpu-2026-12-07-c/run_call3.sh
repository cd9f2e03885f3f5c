#!/bin/bash
# 2026-12-07 (third session), call 3. Carry: .whl, .whl-peers-b, benchmarks/out/data, benchmarks/out/snap3
# (benchmarks/out/snap3 = `git archive` of the commit under test, so that edits in the workspace during the
# call cannot reach it). After the MLP chunks were sized from the room under the budget: the memory-matched
# rows against Unsloth in one benchmark run (QLoRA, full FT), and full FT at a 10 GiB budget.
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl
cd benchmarks/out/snap3 && git -C $ROOT log -1 --format=%h > /tmp/commit.txt 2>/dev/null; cat COMMIT 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/res3; mkdir -p $R
save() { tar czf $OUT/res3.tgz --exclude='ckpt-*' -C /tmp res3; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 10; do save; done) &
B="python3 benchmarks/sft.py all --model llama --data $ROOT/benchmarks/out/data --out $R --peer-path /tmp/peers"
S='^==|whole|rror|FAILED|skipped'
$B --configs unsloth_qlora,unsloth_patch_qlora_budget,unsloth,unsloth_patch_budget 2>&1 | grep --line-buffered -E "$S"
UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 $B --configs unsloth_patch --tag=-10gb 2>&1 | grep --line-buffered -E "$S"
python3 benchmarks/sft.py report --out $R 2>&1 | grep '^|' 
save
