#!/usr/bin/env bash
# Back from a GPU leg (scripts/gpu_train.sh): put the files that came back from the device
# into the run folder, so the run resumes here where the GPU left it (the same step, weights,
# optimiser, schedule and random state; the streamed crops differ, as the fonts are the
# bundle's subsets there and Debian's files here).
#     bash scripts/gpu_unpack.sh FILES_AT [RUN]        # RUN default: runs/gpu-v5
# Then, on this machine's cores (the stream's 13 render processes become one, a run-defining change):
#     safl train --out runs/gpu-v5 --resume --override-saved --device cpu --threads 1 --stream-workers 1
# The saved config names the bundle's real crops (.gpu/real/*): resume from the repository root
# with .gpu/real beside it.
set -euo pipefail
src=${1:?usage: gpu_unpack.sh FILES_AT [RUN]}
run=${2:-runs/gpu-v5}
mkdir -p "$run"
tar -xf "$src/run.tar" -C "$run"
cp "$src/last.safetensors" "$run/"
cat "$src"/state.pt.part-* > "$run/state.pt"
[ -f "$src/gpu_check.tar" ] && tar -xf "$src/gpu_check.tar" -C "$run"
[ -f "$src/train.log" ] && cp "$src/train.log" "$run/"
echo "unpacked into $run: $(ls "$run" | tr '\n' ' ')"
[ -d .gpu/real ] || echo "note: no .gpu/real here: python scripts/gpu_bundle.py rebuilds it (the same crops) before --resume" >&2
