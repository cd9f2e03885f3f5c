#!/bin/bash
# One benchmark run longer than a device call (benchmarks/README.md). Run from the repository root there:
#   bash benchmarks/detached.sh start RUN NAME   first call (carry .whl, .whl-peers-b, benchmarks/out/data,
#                                                benchmarks/out/snap): installs the wheels, copies the snapshot
#                                                to /tmp/snap and the data to /tmp/data, starts RUN (a path inside
#                                                the snapshot) with setsid so it outlives the call, then polls
#   bash benchmarks/detached.sh poll NAME        each later call, sent at once: waits up to ~560 s for
#                                                /tmp/NAME/DONE, sends /tmp/NAME and its log back as $OUT/NAME.tgz
# RUN runs in /tmp/snap with the run environment already set (offline Hugging Face, the wheels on PYTHONPATH,
# unbuffered output), R=/tmp/NAME (its results folder, holding commit.txt and card.txt), B (the sft.py command
# line every benchmark row uses) and step (a function that logs a "## time command" line, then runs the command):
# a run script holds only its steps. RUN writes its results under $R and touches $R/DONE at its end.
set -u
poll() {
  local name=$1
  save() { tar czf "$OUT/$name.tgz" --exclude='ckpt-*' -C /tmp "$name" "$name.log" 2>/dev/null; }
  for _ in $(seq 1 56); do
    [ -e "/tmp/$name/DONE" ] && break
    sleep 10; save
  done
  save
  grep -E '^## |whole|FAILED|skipped|rror' "/tmp/$name.log" | tail -60
}
case "${1:-}" in
  start)
    run=$2 name=$3
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl || exit 1
    rm -rf /tmp/snap /tmp/data && cp -r benchmarks/out/snap /tmp/snap && cp -r benchmarks/out/data /tmp/data
    export R=/tmp/$name PYTHONPATH=/tmp/site:/tmp/snap PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
      HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
    export B="python3 benchmarks/sft.py all --data /tmp/data --out $R --peer-path /tmp/peers"
    step() { echo "## $(date +%T) $*"; "$@"; }
    export -f step
    mkdir -p "$R" && cp /tmp/snap/COMMIT "$R/commit.txt"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$R/card.txt"
    (cd /tmp/snap && setsid nohup bash "/tmp/snap/$run" > "/tmp/$name.log" 2>&1 < /dev/null &)
    sleep 2; echo started; poll "$name" ;;
  poll) poll "$2" ;;
  *) echo "usage: $0 start RUN NAME | poll NAME" >&2; exit 2 ;;
esac
