#!/usr/bin/env bash
# The whole GPU leg in one device call (issue 31, point 4): train the current lineage for
# MINUTES with synthetic crops rendered on the fly by the machine's cores, leave the run's
# state under $OUT so it continues on a CPU machine, then run the GPU serving check
# (bench/gpu_check.sh) on the same machine.
#
# Sized to the device budget: one command may run 10 minutes (the machine's start and the
# transfers come on top, from a 15-minute budget), so the default is 5 minutes of training,
# about 1 of start-up and validation, and about 3 of serving check (CHECK=0 skips it and
# leaves room for MINUTES=8). Prepare here, once per leg:
#
#     python scripts/gpu_bundle.py                                          # .gpu/: fonts, textures, crops, wheels, init (default: the shipped weights)
#     device run (carry .gpu): bash scripts/gpu_train.sh
#     bash scripts/gpu_unpack.sh <files_at>                                  # back here: runs/gpu-v4, resumable
#
# What comes back (at most 8 files of 16 MiB): last.safetensors + last.json (the weights),
# state.pt.part-* (the resumable state, split), run.tar (config, log, best weights' sidecar,
# train.log), gpu_check.tar (the serving check's tables).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MINUTES=${MINUTES:-5}
CHECK=${CHECK:-1}
RUN=${RUN:-runs/gpu-v4}
OUT=${OUT:-runs/gpu-out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
t0=$(date +%s)

# The image has torch but not the service's stack: install the bundled wheels (no network) and
# the renderer's fonts and textures. A dry run on a CPU machine that has them: DEVICE=cpu ASSETS=0.
if [ "${ASSETS:-1}" = 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
    mkdir -p /usr/share/fonts/truetype/safl-bundle /usr/share/backgrounds/safl-bundle
    cp -n .gpu/fonts/* /usr/share/fonts/truetype/safl-bundle/ 2>/dev/null
    cp -n .gpu/backgrounds/* /usr/share/backgrounds/safl-bundle/ 2>/dev/null
fi
export PYTHONPATH=/tmp/site:$PWD/.gpu/shim:$PWD PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import os, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cores', os.cpu_count())"

# The recipe of the lineage it continues (issue 31 lever 1: the rectifier taught from the
# renderer's geometry, by the point loss alone: the recognition loss reaching it taught it to
# cut off first letters, training log v4-loc-b); batch 256 keeps 13 render processes ahead of the GPU.
REAL=.gpu/real
# CHARSET="$(cat runs/s34/charset-spaced.txt)" trains the adopted space lever (the stream then renders phrases).
python3 -m model.training.cli train --out "$RUN" --init .gpu/init/init.safetensors ${CHARSET:+--charset "$CHARSET"} \
    --stream-workers "${WORKERS:-13}" --stream-seed "${STREAM_SEED:-41}" \
    --real $REAL/iiit5k $REAL/svt $REAL/ic15 --real-ratio 0.1 --val $REAL/iiit5k $REAL/svt $REAL/ic15 \
    --batch-size "${BATCH:-256}" --lr "${LR:-3e-4}" --warmup-steps 300 --total-steps "${TOTAL:-12000}" --min-lr-ratio 0.05 \
    --degrade 0.3 --point-loss 1 --tps-lr-scale 1 --rectifier-points-only --seed 41 \
    --threads 2 --device "$DEVICE" --val-every 2000 --log-every 100 --checkpoint-minutes 2 \
    --max-minutes "$MINUTES" --resume --no-progress 2>&1 | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}
echo "==> training: exit $rc after $(($(date +%s) - t0)) s"

cp "$RUN/last.safetensors" "$RUN/last.json" "$OUT/" 2>/dev/null
# state.pt holds the optimiser's moments too (3x the weights): split under the 16 MiB a file may have.
[ -f "$RUN/state.pt" ] && split -b 15m -d "$RUN/state.pt" "$OUT/state.pt.part-"
tar -cf "$OUT/run.tar" -C "$RUN" --exclude state.pt --exclude last.safetensors --exclude best.safetensors .

if [ "$CHECK" = 1 ]; then
    echo "==> serving check on the shipped weights"
    DURATION=${DURATION:-10} bash bench/gpu_check.sh /tmp/gpu-check 2>&1 | tee /tmp/gpu-check.log
    cp /tmp/gpu-check.log /tmp/gpu-check/ 2>/dev/null
    tar -cf "$OUT/gpu_check.tar" -C /tmp gpu-check
fi
ls -la "$OUT"
echo "==> done after $(($(date +%s) - t0)) s"
exit "$rc"
