#!/bin/bash
# 2026-12-07 (second session), what of call P ran (the session's last device time, same warm H100 as calls A and C):
# the first profile of run_callP.sh only. Carry: .whl, benchmarks/out/data.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1; UNSLOTH_PATCH_MEMORY_BUDGET_GB=2.09 timeout 140 python3 benchmarks/profile_step.py --config unsloth_patch_qlora --data benchmarks/out/data --out $OUT/qlora-2.09gb.json 2>&1 | tail -18
