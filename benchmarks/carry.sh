#!/bin/bash
# Prepares what a detached benchmark run carries to the device (benchmarks/README.md, "One benchmark run longer
# than a device call") and checks that it fits one call's 64 MiB with the repository:
#   1. benchmarks/out/snap: a `git archive` of HEAD (commit first), without the recorded results of earlier
#      runs (about 10 MB of JSON and logs that no run reads), and its commit in COMMIT;
#   2. .whl/bitsandbytes-*.whl: bitsandbytes ships a library for each CUDA, ROCm and XPU release (43 MB); the
#      device image is CUDA 13.0, so only libbitsandbytes_cuda130.so and the CPU library are kept (about 5 MB),
#      their RECORD lines with them;
#   3. the total of .whl, .whl-peers-b, benchmarks/out/data, benchmarks/out/snap and the tracked files.
# Run from anywhere: bash benchmarks/carry.sh
set -eu
cd "$(dirname "$0")/.."
snap=benchmarks/out/snap
rm -rf "$snap" && mkdir -p "$snap"
git archive HEAD | tar -x -C "$snap"
git rev-parse --short HEAD > "$snap/COMMIT"
find "$snap/benchmarks/results" -mindepth 1 -maxdepth 1 ! -name gpu-next -exec rm -rf {} +
kept='libbitsandbytes_(cuda130|cpu)\.so$'  # the device image's CUDA, and the CPU fallback
for wheel in .whl/bitsandbytes-*.whl; do
    [ -e "$wheel" ] || continue
    dropped=$(unzip -Z1 "$wheel" | grep 'libbitsandbytes_.*\.so$' | grep -Ev "$kept" || true)
    [ -n "$dropped" ] || continue  # slim already
    tmp=$(mktemp -d)
    unzip -q "$wheel" -d "$tmp"
    for name in $dropped; do
        rm "$tmp/$name"
        sed -i "\#^$name,#d" "$tmp"/bitsandbytes-*.dist-info/RECORD
    done
    rm "$wheel"
    (cd "$tmp" && zip -q -r "$OLDPWD/$wheel" .)
    rm -rf "$tmp"
done
carried=$(du -smc .whl .whl-peers-b benchmarks/out/data "$snap" 2>/dev/null | tail -1 | cut -f1)
tracked=$(git ls-files -z | du -smc --files0-from=- | tail -1 | cut -f1)
echo "snapshot of $(cat "$snap/COMMIT"); carried ${carried} MiB + tracked ${tracked} MiB = $((carried + tracked)) MiB (limit 64)"
[ $((carried + tracked)) -lt 64 ]
