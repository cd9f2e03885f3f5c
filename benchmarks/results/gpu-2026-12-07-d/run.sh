#!/bin/bash
# 2026-12-07 (fourth session): one benchmark run, started detached (setsid) by start.sh and collected by
# poll.sh across device calls on one warm machine. Runs from /tmp/snap, a copy of benchmarks/out/snap6
# (`git archive` of the commit under test, named in COMMIT), so nothing of the workspace can reach it.
# Every row is a fresh process with an empty Triton cache (`sft.py all`); rows in order of importance.
set -u
R=/tmp/res6; mkdir -p $R
cd /tmp/snap
cp COMMIT $R/commit.txt
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
B="python3 benchmarks/sft.py all --data /tmp/data --out $R --peer-path /tmp/peers"
step() { echo "## $(date +%T) $*"; "$@"; }
# 1. the reference workload (Llama-shaped 1.1B, full FT): stock; this build cold, then warm
step $B --model llama --configs stock
step $B --model llama --configs unsloth_patch --warm
# 2. full FT at Unsloth's measured peak, and at a 10 GiB budget
step $B --model llama --configs unsloth,unsloth_patch_budget
UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 step $B --model llama --configs unsloth_patch --tag=-10gb
# 3. LoRA r=16 on every linear layer; 4. QLoRA (nf4, double quantisation)
step $B --model llama --configs unsloth_lora,unsloth_patch_lora_budget,stock_lora,unsloth_patch_lora
step $B --model llama --configs unsloth_qlora,unsloth_patch_qlora_budget,stock_qlora,unsloth_patch_qlora
# 5. the second family: Qwen3-shaped 0.94B, full FT
step $B --model qwen3 --configs stock,unsloth_patch
# a later build, carried to /tmp/snap7 by a poll call while this run went on (its commit in /tmp/snap7/COMMIT):
# QLoRA again, in the same run as the rows above (sft.py --patch-path puts its package ahead of this one's)
if [ -d /tmp/snap7 ]; then cp /tmp/snap7/COMMIT $R/commit-next.txt
  step $B --model llama --configs unsloth_patch_qlora --patch-path /tmp/snap7 --tag=-next
  step $B --model llama --configs unsloth_qlora,unsloth_patch_qlora_budget --patch-path /tmp/snap7 --tag=-next
fi
step $B --model qwen3 --configs unsloth,unsloth_patch_budget
# 6. the default policy on smaller cards (budget = 90% of the card): LoRA after a probe that picks `none`
#    (40 GB), full FT on 24 GB (mlp_recompute before selective), LoRA on 16 GB (the probe's early rejection)
UNSLOTH_PATCH_MEMORY_BUDGET_GB=33.53 step $B --model llama --configs unsloth_patch_lora --tag=-card40
UNSLOTH_PATCH_MEMORY_BUDGET_GB=20.12 step $B --model llama --configs unsloth_patch --tag=-card24
UNSLOTH_PATCH_MEMORY_BUDGET_GB=13.41 step $B --model llama --configs unsloth_patch_lora --tag=-card16
echo "## $(date +%T) done"
touch $R/DONE
