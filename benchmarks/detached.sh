#!/bin/bash
# One benchmark run longer than a device call (benchmarks/README.md). Run from the repository root there:
#   bash benchmarks/detached.sh start RUN NAME   first call (carry .whl, .whl-peers-b, benchmarks/out/data,
#                                                benchmarks/out/snap): installs the wheels, copies the snapshot
#                                                to /tmp/snap and the data to /tmp/data, starts RUN (a path inside
#                                                the snapshot) with setsid so it outlives the call, then polls
#   bash benchmarks/detached.sh poll NAME        each later call, sent at once: waits up to ~560 s for
#                                                /tmp/NAME/DONE, sends /tmp/NAME and its log back as $OUT/NAME.tgz
# RUN writes its results under /tmp/NAME and touches /tmp/NAME/DONE at its end.
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
    setsid nohup bash "/tmp/snap/$run" > "/tmp/$name.log" 2>&1 < /dev/null &
    sleep 2; echo started; poll "$name" ;;
  poll) poll "$2" ;;
  *) echo "usage: $0 start RUN NAME | poll NAME" >&2; exit 2 ;;
esac
