#!/bin/bash
# 2026-12-07, call 1 (asked for any H100 or H200; ran on an NVIDIA H100 80GB HBM3, a slower host than 2026-12-06 and stopped at its 600 s limit after six of the eight rows: this session's H200 requests were refused). Carry: .whl (../shared/gpu-wheels.sh + bitsandbytes 0.50.2 with only its CUDA 13.0 library
# kept), .whl-peers-b (benchmarks/peers.sh, the unsloth wheel without its studio/ folder), benchmarks/out/data.
# LoRA r=16 and QLoRA nf4 on the reference workload: Unsloth 2026.10.9, this build at Unsloth's measured peak
# (memory-matched), stock TRL, this build without a budget; each in a fresh process with an empty Triton cache, in
# one `all` run (the budget rows read Unsloth's peak from it).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/tmp/res1; mkdir -p $R
save() { tar czf $OUT/res1.tgz -C /tmp res1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
(while sleep 15; do save; done) &
python3 benchmarks/sft.py all --model llama --data benchmarks/out/data --out $R --peer-path /tmp/peers \
  --configs unsloth_lora,unsloth_patch_lora_budget,unsloth_qlora,unsloth_patch_qlora_budget,stock_lora,stock_qlora,unsloth_patch_lora,unsloth_patch_qlora \
  2>&1 | grep -E '^==|whole|rror|FAILED|skipped' | head -40
save
