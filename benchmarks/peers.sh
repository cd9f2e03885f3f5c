#!/bin/bash
# Downloads, on a machine with network, the wheels that the benchmark's `unsloth` configuration needs on
# the GPU machine (Python 3.12, x86-64, torch 2.11 + CUDA 13.0, no network). Run from anywhere:
#
#   bash benchmarks/peers.sh
#
# Two folders, because one device call carries at most 64 MiB of working tree and bitsandbytes (43 MB)
# and unsloth (29 MB) do not fit together:
#   .whl-peers-a/  bitsandbytes                                          (install in the first call)
#   .whl-peers-b/  unsloth, unsloth_zoo, trl 1.15, datasets, dill, multiprocess (install in the second)
# benchmarks/README.md gives the two commands. Both folders are git-ignored through .git/info/exclude.
# Idempotent: wheels already there are kept, wheels of other versions are removed.
#
# What is carried, and why (Unsloth 2026.10.9's Requires-Dist, recursively, minus the GPU image):
#   unsloth, unsloth_zoo   the library under test (unsloth_zoo>=2026.10.9 is a hard import)
#   trl==1.15.0            unsloth requires trl<=1.15.0; the other configurations use trl 1.16 from .whl/
#   datasets, dill, multiprocess   datasets<5 (also what the benchmark builds its dataset with)
#   bitsandbytes           Unsloth's SFTConfig defaults to optim="adamw_8bit", which needs it
# Required by the wheels' metadata but left out, because nothing on this path imports them:
#   xformers               wheels pin one torch build; unsloth catches its absence and uses PyTorch SDPA
#   torchao                only fp8 / QAT / int4 paths, each behind importlib.util.find_spec("torchao")
#   cut_cross_entropy      unsloth_zoo sets UNSLOTH_ENABLE_CCE=0 on torch >= 2.8, so the kernel is not used
#   tyro, pydantic, json5, structlog, msgspec   the `unsloth` CLI, Unsloth Studio and the vLLM path only
#   hf_transfer, diffusers Hub downloads (the GPU machine has no network) and diffusion models
# Already on the GPU image: torch, torchvision, triton, transformers 5.17, peft, accelerate, numpy,
# pyarrow, pandas, sentencepiece, protobuf, psutil, tqdm, einops, safetensors, huggingface_hub, xxhash,
# fsspec, requests, regex, pillow, packaging, wheel, typer, rich, pyyaml, click, certifi, jinja2.
set -eu
cd "$(dirname "$0")/.."

UNSLOTH=${UNSLOTH:-2026.10.9}
A=(bitsandbytes==0.50.2)
B=("unsloth==$UNSLOTH" "unsloth_zoo==$UNSLOTH" trl==1.15.0 datasets==4.8.5 dill==0.4.0 multiprocess==0.70.18)

fetch() {  # fetch DIR SPEC...
    local dir=$1
    shift
    mkdir -p "$dir"
    grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
    # drop wheels that are not one of the pinned name==version
    local whl keep spec name
    for whl in "$dir"/*.whl; do
        [ -e "$whl" ] || continue
        keep=0
        for spec in "$@"; do
            name=$(echo "${spec%%==*}" | tr '[:upper:]-' '[:lower:]_')
            case "$(basename "$whl" | tr '[:upper:]' '[:lower:]')" in
                "$name-${spec#*==}-"*) keep=1 ;;
            esac
        done
        [ $keep = 1 ] || { echo "removing $whl"; rm -f "$whl"; }
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "$@" 2>&1 | grep -v "is ignored" || true
    local n
    n=$(ls "$dir"/*.whl 2>/dev/null | wc -l)
    if [ "$n" != "$#" ]; then
        echo "error: $dir holds $n wheels, expected $#" >&2
        exit 1
    fi
    ls -l "$dir"
    du -sh "$dir"
}

fetch .whl-peers-a "${A[@]}"
fetch .whl-peers-b "${B[@]}"
# one device call carries at most 64 MiB, the repository and benchmarks/out/data (about 5 MB) included
for dir in .whl-peers-a .whl-peers-b; do
    size=$(du -sm "$dir" | cut -f1)
    [ "$size" -lt 56 ] || echo "warning: $dir is $size MiB; with the repository and data it may not fit one call" >&2
done
