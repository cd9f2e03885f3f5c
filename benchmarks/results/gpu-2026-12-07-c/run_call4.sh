#!/bin/bash
# 2026-12-07 (third session), call 4. Carry: .whl, .whl-peers-b, benchmarks/out/data, benchmarks/out/snap3
# (benchmarks/out/snap3 = `git archive` of the commit under test, so that edits in the workspace during the
# call cannot reach it). The default policy on 16, 24 and 40 GB cards, simulated by a budget of 90% of the
# card (as the policy budgets a real card): full fine-tuning and LoRA, the user's default script.
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl
cd benchmarks/out/snap3 && git -C $ROOT log -1 --format=%h > /tmp/commit.txt 2>/dev/null; cat COMMIT 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/res4; mkdir -p $R
save() { tar czf $OUT/res4.tgz --exclude='ckpt-*' -C /tmp res4; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 10; do save; done) &
B="python3 benchmarks/sft.py all --model llama --data $ROOT/benchmarks/out/data --out $R --peer-path /tmp/peers"
S='^==|whole|rror|FAILED|skipped'
for card in 16 24 40; do
  budget=$(python3 -c "print(round(0.9 * $card * 1e9 / 2**30, 2))")
  for config in unsloth_patch unsloth_patch_lora; do
    UNSLOTH_PATCH_MEMORY_BUDGET_GB=$budget $B --configs $config --tag=-card$card 2>&1 | grep --line-buffered -E "$S"
  done
done
save
