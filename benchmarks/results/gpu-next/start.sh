#!/bin/bash
# First device call: install the wheels, copy the snapshot and the data to /tmp, start run.sh detached.
# Carry: .whl, .whl-peers-b, benchmarks/out/data, benchmarks/out/snap.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-b/*.whl .whl/bitsandbytes-*.whl || exit 1
rm -rf /tmp/snap /tmp/data && cp -r benchmarks/out/snap /tmp/snap && cp -r benchmarks/out/data /tmp/data
setsid nohup bash /tmp/snap/benchmarks/results/gpu-next/run.sh > /tmp/runn.log 2>&1 < /dev/null &
sleep 2; echo started; exec bash benchmarks/results/gpu-next/poll.sh
