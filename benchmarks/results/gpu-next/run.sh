#!/bin/bash
# Prepared on 2026-12-07 (fifth session, revised in the sixth) for the next device session: what the open issues still need
# measured, in order of what closes most. Ask `status` first and take nvidia-h200 if it is lent (issues
# 13-15 name the H200; the 80 GiB longest-context budget needs one). Run it as gpu-2026-12-07-e was run: make a
# snapshot `benchmarks/out/snap` (`git archive HEAD | tar -x -C benchmarks/out/snap; git rev-parse --short HEAD >
# benchmarks/out/snap/COMMIT`), then `bash benchmarks/detached.sh start benchmarks/results/gpu-next/run.sh resn`
# (carry .whl, .whl-peers-b, benchmarks/out/data, benchmarks/out/snap) and `bash benchmarks/detached.sh poll resn`
# at once after each call. Sections 1-2 take about 15 minutes, section 3 about 12; 4 and 5 as time allows.
set -u
R=/tmp/resn; mkdir -p $R
cd /tmp/snap
cp COMMIT $R/commit.txt
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/card.txt
B="python3 benchmarks/sft.py all --data /tmp/data --out $R --peer-path /tmp/peers"
L="python3 benchmarks/longest_context.py all --model llama8b --out $R/longest --peer-path /tmp/peers"
step() { echo "## $(date +%T) $*"; "$@"; }
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  # 1. issues 13-15: the rows users compare on, in one run (an H200 if this is one). QLoRA keeps its 4-bit weights
  #    dense by default since the fifth session; per_call is the previous default. lora at 3.5 GiB: issue 14's row
  step $B --model llama --configs stock,unsloth,unsloth_patch_budget,unsloth_patch,unsloth_patch_plain_ckpt
  step $B --model llama --configs unsloth_lora,unsloth_patch_lora_budget,stock_lora,unsloth_patch_lora
  UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.5 step $B --model llama --configs unsloth_patch_lora --tag=-3.5gb
  step $B --model llama --configs unsloth_qlora,unsloth_patch_qlora_budget,stock_qlora,unsloth_patch_qlora,unsloth_patch_qlora_per_call
  # 2. issue 14: the 10 GiB budget against Unsloth, a second repeat of each (the fifth session: 0.99x and 1.01x)
  UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 step $B --model llama --configs unsloth_patch --tag=-10gb --first-repeat 1
  step $B --model llama --configs unsloth --tag=-r2
  UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 step $B --model llama --configs unsloth_patch --tag=-10gb --first-repeat 2
  # 3. issue 14: longest context at 24 GiB. Unsloth first (the fifth session ran out of device time during its load);
  #    this build from where the fifth session's search stopped (131,072 trained at 22.2 GiB)
  step $L --budgets 24 --configs unsloth_qlora --start 32768 --granularity 8192 --time-limit-s 300
  step $L --budgets 24 --configs unsloth_patch_qlora --start 131072 --granularity 16384 --time-limit-s 420
  python3 benchmarks/longest_context.py report --out $R/longest > $R/longest.md 2>&1
  # 4. issue 13: the second family (Qwen3-shaped) and the step profiles, ours against Unsloth's where it profiles
  step $B --model qwen3 --configs stock,unsloth,unsloth_patch_budget,unsloth_patch
  step python3 benchmarks/profile_step.py --config unsloth_patch --data /tmp/data --out $R/profile-ours.json
  step python3 benchmarks/profile_step.py --config unsloth_patch_plain_ckpt --data /tmp/data --out $R/profile-ours-ckpt.json
  python3 benchmarks/profile_step.py report --results $R/profile-*.json > $R/profile.md 2>&1
  # 5. issue 14: longest context at 80 GiB (an H200 only: an H100 80GB cannot give the budget)
  step $L --budgets 80 --configs stock_qlora --start 65536 --granularity 16384 --time-limit-s 300
  step $L --budgets 80 --configs unsloth_qlora,unsloth_patch_qlora --start 262144 --granularity 32768 --time-limit-s 420
  python3 benchmarks/longest_context.py report --out $R/longest > $R/longest.md 2>&1
else
# Not an H200 (five sessions of 2026-12-07 got H100s). The sixth session measured Unsloth's 24 GiB longest context
# and the 3.5 GiB LoRA row, and found that a second Unsloth process read the first one's compile caches: sft.py now
# empties Triton's, Inductor's and Unsloth's caches for every cold row, so the full-FT comparison runs again first,
# with the 10 GiB repeats beside it; then the LoRA rows (the budget goals sit at 1.14-1.21x) and QLoRA, and the
# probe's split step times (probe_steps[].parts) come with every budget row
  step $B --model llama --configs stock,unsloth,unsloth_patch_budget,unsloth_patch,unsloth_patch_plain_ckpt
  UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 step $B --model llama --configs unsloth_patch --tag=-10gb --first-repeat 1
  step $B --model llama --configs unsloth --tag=-r2
  UNSLOTH_PATCH_MEMORY_BUDGET_GB=10 step $B --model llama --configs unsloth_patch --tag=-10gb --first-repeat 2
  step $B --model llama --configs unsloth_lora,unsloth_patch_lora_budget,stock_lora,unsloth_patch_lora
  UNSLOTH_PATCH_MEMORY_BUDGET_GB=3.5 step $B --model llama --configs unsloth_patch_lora --tag=-3.5gb
  step $B --model llama --configs unsloth_qlora,unsloth_patch_qlora_budget,stock_qlora,unsloth_patch_qlora
  step python3 benchmarks/profile_step.py --config unsloth_patch_plain_ckpt --data /tmp/data --out $R/profile-ours-ckpt.json
  python3 benchmarks/profile_step.py report --results $R/profile-*.json > $R/profile.md 2>&1
fi
echo "## $(date +%T) done"
touch $R/DONE
