#!/usr/bin/env bash
# Back from a GPU leg (scripts/gpu_train.sh): put the files that came back from the device
# into the run folder, so the run resumes here exactly where the GPU left it.
#     bash scripts/gpu_unpack.sh FILES_AT [RUN]        # RUN default: runs/gpu-v4
# Then, on this machine's cores (the stream's 13 render processes become one, a run-defining change):
#     safl train --out runs/gpu-v4 --resume --override-saved --device cpu --threads 1 --stream-workers 1
set -euo pipefail
src=${1:?usage: gpu_unpack.sh FILES_AT [RUN]}
run=${2:-runs/gpu-v4}
mkdir -p "$run"
tar -xf "$src/run.tar" -C "$run"
cp "$src/last.safetensors" "$src/last.json" "$run/"
cat "$src"/state.pt.part-* > "$run/state.pt"
[ -f "$src/gpu_check.tar" ] && tar -xf "$src/gpu_check.tar" -C "$run"
echo "unpacked into $run: $(ls "$run" | tr '\n' ' ')"
