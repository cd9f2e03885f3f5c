#!/bin/bash
# 2026-12-06, call 2 as prepared; NOT RUN (too little device time was left: run_call2b.sh ran instead). Carry: .whl (as call 1, bitsandbytes included), .whl-peers-b (benchmarks/peers.sh, with the
# unsloth wheel's studio/ folder taken out: the Studio web app, never imported on the training path; 64 MiB carry
# limit), benchmarks/out/data. LoRA r=16 and QLoRA nf4: stock TRL, Unsloth 2026.10.9 and this build, the budget rows
# set to Unsloth's measured peak (memory-matched), each in a fresh process, in one `all` run (the budget rows read
# Unsloth's peak from it).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/res2; mkdir -p $R
save() { tar czf $OUT/res2.tgz -C /tmp res2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 20; do save; done) &
python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --peer-path /tmp/peers \
  --configs stock_lora,unsloth_lora,unsloth_patch_lora_budget,unsloth_patch_lora,stock_qlora,unsloth_qlora,unsloth_patch_qlora_budget,unsloth_patch_qlora \
  2>&1 | grep -E '^==|whole|rror|FAILED|skipped' | head -40
save
