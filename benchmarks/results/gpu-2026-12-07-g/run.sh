#!/bin/bash
# RECORD (seventh session of 2026-12-07): run as prepared on an H100 80GB from a snapshot of bf3c5a4. The -uniform and
# -r2 LoRA rows of section 1 and the QLoRA -uniform row were skipped by sft.py (a budget row needs its peer's peak
# from the same call); the script was stopped during the last line's stock_lora row, and the uniform LoRA pair run
# instead: env UNSLOTH_PATCH_CHECKPOINTING=uniform python3 benchmarks/sft.py all --data /tmp/data --out /tmp/resn
# --peer-path /tmp/peers --model llama --configs unsloth_lora,unsloth_patch_lora_budget --tag=-uniform
# Prepared on 2026-12-07 (seventh session) for the device: per-batch checkpointing choices
# (UNSLOTH_PATCH_CHECKPOINTING=auto, new) against every batch run as the worst one (=uniform, the build before),
# A/B in one run, where the issues' budget goals sit at the edge: LoRA at Unsloth's 3.37 GiB (1.14x, goal 1.2x),
# full FT at 10 GiB (0.73x Unsloth at the median step), QLoRA at 2.09 GiB; then the unconstrained rows. On an
# H200 the 80 GiB longest context follows. Run as gpu-2026-12-07-f was run: a snapshot in benchmarks/out/snap
# (`git archive HEAD | tar -x -C benchmarks/out/snap; git rev-parse --short HEAD > benchmarks/out/snap/COMMIT`),
# then `bash benchmarks/detached.sh start benchmarks/results/gpu-next/run.sh resn` (carry .whl, .whl-peers-b,
# benchmarks/out/data, benchmarks/out/snap) and `bash benchmarks/detached.sh poll resn` at once after each call.
set -u
R=/tmp/resn; mkdir -p $R
cd /tmp/snap
cp COMMIT $R/commit.txt
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
B="python3 benchmarks/sft.py all --data /tmp/data --out $R --peer-path /tmp/peers"
L="python3 benchmarks/longest_context.py all --model llama8b --out $R/longest --peer-path /tmp/peers"
step() { echo "## $(date +%T) $*"; "$@"; }
U="env UNSLOTH_PATCH_CHECKPOINTING=uniform"
# 1. LoRA at Unsloth's memory (3.37 GiB): per batch against uniform, twice, interleaved, beside Unsloth
step $B --model llama --configs unsloth_lora,unsloth_patch_lora_budget
step $U $B --model llama --configs unsloth_patch_lora_budget --tag=-uniform
step $B --model llama --configs unsloth_patch_lora_budget --tag=-r2
step $U $B --model llama --configs unsloth_patch_lora_budget --tag=-uniform-r2
# 2. full FT at 10 GiB: per batch against uniform, beside Unsloth
step $B --model llama --configs unsloth
UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 step $B --model llama --configs unsloth_patch --tag=-10gb
UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 step $U $B --model llama --configs unsloth_patch --tag=-10gb-uniform
UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.5 step $B --model llama --configs unsloth_patch_lora --tag=-3.5gb
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  # 3. issue 14: longest context at 80 GiB (an H200 only: an H100 80GB cannot give the budget)
  step $L --budgets 80 --configs unsloth_patch_qlora --start 262144 --granularity 32768 --time-limit-s 360
  step $L --budgets 80 --configs unsloth_qlora --start 262144 --granularity 32768 --time-limit-s 360
  python3 benchmarks/longest_context.py report --out $R/longest > $R/longest.md 2>&1
fi
# 4. QLoRA at Unsloth's memory, per batch against uniform; stock and the unconstrained rows for the whole-run ratios
step $B --model llama --configs unsloth_qlora,unsloth_patch_qlora_budget
step $U $B --model llama --configs unsloth_patch_qlora_budget --tag=-uniform
step $B --model llama --configs stock_lora,stock,stock_qlora,unsloth_patch_lora,unsloth_patch,unsloth_patch_qlora
echo "## $(date +%T) done"
touch $R/DONE
