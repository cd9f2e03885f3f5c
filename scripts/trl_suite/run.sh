#!/bin/bash
# TRL's own tests/test_sft_trainer.py on the CPU, offline, three ways:
#   run.sh A   stock TRL
#   run.sh B   unsloth_patch imported before TRL
#   run.sh C   as B, with UNSLOTH_PATCH_MEMORY_BUDGET_GB=8 (the checkpointing probe runs)
# Environment: WORK (scratch folder: src/ from prepare.py, hf_home/ from build_models.py, results),
# PYTHON (a venv with the TRL under test, transformers, torch CPU, pytest), REPO (this checkout).
# Then: python compare.py $WORK  (per-test differences of B and C against A).
set -eu
V=$1
HERE=$(cd "$(dirname "$0")" && pwd)
: "${WORK:?set WORK}" "${PYTHON:?set PYTHON}"
REPO=${REPO:-$(cd "$HERE/../.." && pwd)}
cd "$WORK/src"
export HF_HOME=$WORK/hf_home HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OFFLINE_HUB_TIMEOUT=180 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
export CUDA_VISIBLE_DEVICES= OFFLINE_HUB_DESELECTED=$WORK/deselected_$V.tsv
PLUG="-p offline_hub"
case $V in
  A) export PYTHONPATH=$HERE ;;
  B) export PYTHONPATH=$HERE:$REPO; PLUG="-p unsloth_first -p offline_hub" ;;
  C) export PYTHONPATH=$HERE:$REPO UNSLOTH_PATCH_MEMORY_BUDGET_GB=8; PLUG="-p unsloth_first -p offline_hub" ;;
  *) echo "usage: run.sh A|B|C" >&2; exit 2 ;;
esac
"$PYTHON" -m pytest -p no:cacheprovider $PLUG -q -rA --junitxml="$WORK/junit_$V.xml" -o junit_family=xunit2 \
  tests/test_sft_trainer.py > "$WORK/log_$V.txt" 2>&1 || true
tail -1 "$WORK/log_$V.txt"
