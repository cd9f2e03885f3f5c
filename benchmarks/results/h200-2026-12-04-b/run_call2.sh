#!/bin/bash
# Prepared in the second session of 2026-12-04; not run. Call A of a pair (carry .whl-peers-a): bitsandbytes
# into /tmp/peers. Call run_call3.sh (LoRA) or run_call4.sh (QLoRA) right after it, on the same warm machine.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl-peers-a/*.whl
ls /tmp/peers
