#!/bin/bash
# 2026-12-07 (second session), call P: where the QLoRA step at Unsloth's memory goes. Carry: .whl, benchmarks/out/data.
# Only its first profile ran (run_callP_partial.sh): the device time ran out.
# torch profiler over 10 steady steps (after 10 untraced), benchmarks/profile_step.py: QLoRA at a 2.09 GiB budget
# (the policy offloads), QLoRA with TRL's plain checkpointing (UNSLOTH_PATCH_CHECKPOINTING=off), QLoRA without a
# budget (no checkpointing).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=/tmp/resP; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/card.txt
P="python3 benchmarks/profile_step.py --config unsloth_patch_qlora --data benchmarks/out/data"
UNSLOTH_PATCH_MEMORY_BUDGET_GB=2.09 $P --out $R/qlora-2.09gb.json 2>&1 | tail -16
UNSLOTH_PATCH_CHECKPOINTING=off $P --out $R/qlora-plain-ckpt.json 2>&1 | tail -16
$P --out $R/qlora-none.json 2>&1 | tail -16
cp $R/* $OUT/
