#!/bin/bash
# 2026-12-07 (fifth session): what ran, as prepared in gpu-next by the fourth session. Started with
# `bash benchmarks/detached.sh start benchmarks/results/gpu-next/run.sh resn` (this file is its copy) from a
# `git archive` of c2c11c0 and collected by `detached.sh poll resn` over three calls on one warm H100 80GB (no
# H200 was lent). Sections 1-3 finished; section 4 was cut by the end of the device time during unsloth_qlora.
set -u
R=/tmp/resn; mkdir -p $R
cd /tmp/snap
cp COMMIT $R/commit.txt
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
B="python3 benchmarks/sft.py all --data /tmp/data --out $R --peer-path /tmp/peers"
step() { echo "## $(date +%T) $*"; "$@"; }
# 1. issue 15: nf4 bit-exactness and bf16 tolerances of the current build on the GPU (the kept scales came after
#    the last GPU check), about a minute
step python3 benchmarks/lora_fusion_check.py --quant nf4 --out $R/check-nf4.json
step python3 benchmarks/lora_fusion_check.py --out $R/check.json
# 2. issues 13-15 on the H200 if this is one: the rows users compare on, one run (plain_ckpt: issue 13's
#    full-checkpointing figure)
step $B --model llama --configs stock,unsloth,unsloth_patch_budget,unsloth_patch,unsloth_patch_plain_ckpt
step $B --model llama --configs unsloth_lora,unsloth_patch_lora_budget,stock_lora,unsloth_patch_lora
step $B --model llama --configs unsloth_qlora,unsloth_patch_qlora_budget,stock_qlora,unsloth_patch_qlora,unsloth_patch_qlora_dense
# 3. issue 14: the 10 GiB row against the 9.38 GiB one, interleaved, with the MLP chunk A/B (the fourth session's
#    10 GiB row ran on a slower host moment: 6.2 ms between steps against 4.1-4.7)
for r in 1 2; do
  UNSLOTH_PATCH_MEMORY_BUDGET_GB=9.38 step $B --model llama --configs unsloth_patch --tag=-9.38gb --first-repeat $r
  UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 step $B --model llama --configs unsloth_patch --tag=-10gb --first-repeat $r
  UNSLOTH_PATCH_KERNELS_OFF=mlp_chunk UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 step $B --model llama --configs unsloth_patch --tag=-10gb-chunkoff --first-repeat $r
done
# 4. issue 14: longest context, Llama-3.1-8B-shaped QLoRA at 24 GiB (each search bounded; 80 GiB in a later call)
step python3 benchmarks/longest_context.py all --model llama8b --budgets 24 --configs stock_qlora,unsloth_patch_qlora,unsloth_qlora \
  --out $R/longest --peer-path /tmp/peers --start 8192 --granularity 4096 --time-limit-s 150
python3 benchmarks/longest_context.py report --out $R/longest > $R/longest.md 2>&1
echo "## $(date +%T) done"
touch $R/DONE
