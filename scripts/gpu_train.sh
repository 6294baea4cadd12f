#!/usr/bin/env bash
# The whole GPU leg in one device call (issue 31, point 4): the GPU serving check
# (bench/gpu_check.sh) on the shipped weights, then training the lineage with synthetic crops
# rendered on the fly by the machine's cores until DEADLINE, leaving the run's state under $OUT
# so that it continues on a CPU machine.
#
# Sized to the device budget: one command may run 600 s (the machine's start and the transfers
# come on top, from a 15-minute budget). The check runs first, bounded (CHECK_SECONDS, default
# 150; CHECK=0 skips it); training then gets what is left of DEADLINE (default 560 s) less the
# start-up before its clock and the closing validation and copies (about 150 s): about 4-5
# minutes with the check, 6-7 without. A hard stop (SIGTERM, which saves the state after the
# current step) lands before DEADLINE whatever happens. Prepare here, once per leg:
#
#     python scripts/gpu_bundle.py --charset runs/s34/charset-spaced.txt [--init CKPT]   # .gpu/ (the lineage reads the space)
#     device run (carry .gpu, timeout_s 600): bash scripts/gpu_train.sh
#     bash scripts/gpu_unpack.sh <files_at> [RUN]                      # back here: RUN, resumable
#
# What comes back (at most 8 files of 16 MiB): last.safetensors (the weights), state.pt.part-*
# (the resumable state, split), run.tar (config, log, last and best weights' sidecars, best
# weights), train.log, gpu_check.tar (the serving check's tables and log).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)
DEADLINE=${DEADLINE:-560}
CHECK=${CHECK:-1}
RUN=${RUN:-runs/gpu-v5}
OUT=${OUT:-runs/gpu-out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
B=${BUNDLE:-.gpu}  # the bundle (tests/test_gpu_leg.py runs the leg on a small one)
mkdir -p "$OUT"
elapsed() { echo $(($(date +%s) - t0)); }

if [ ! -f "$B/MANIFEST.json" ]; then
    echo "gpu_train: no $B/MANIFEST.json: run python scripts/gpu_bundle.py here and carry .gpu" >&2
    exit 2
fi
cat "$B/MANIFEST.json"

# The image has torch but not the service's stack: install the bundled wheels (no network). A dry
# run on a CPU machine that has them: DEVICE=cpu ASSETS=0.
if [ "${ASSETS:-1}" = 1 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$B"/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$(realpath "$B")/shim:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# The renderer reads the bundle's fonts and textures where they lie (no root, no system folder),
# and only those: the same faces here in a dry run as on the GPU machine.
export SAFL_FONT_DIRS=$(realpath "$B")/fonts SAFL_BACKGROUND_DIRS=$(realpath "$B")/backgrounds
export PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Everything the leg imports, at once: a missing wheel fails here in seconds, not minutes in.
$PY -c "import os, torch, service.app, model.training.train, rapidfuzz, wordfreq; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cores', os.cpu_count())" || exit 2
manifest() { $PY -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$B/MANIFEST.json" "$1"; }
INIT=$(manifest init)
# The shipped init travels with the tree, not the bundle: a model shipped since the bundle was built is refused.
if [ "$(sha256sum "$INIT" | cut -d' ' -f1)" != "$(manifest init_sha256)" ]; then
    echo "gpu_train: $INIT is not the init the bundle was built for (sha256 differs): rebuild .gpu" >&2
    exit 2
fi
CHARSET_ARGS=()
if [ ! -f "$B/charset.txt" ]; then
    echo "note: no $B/charset.txt: the leg trains over the init's charset" >&2
else
    CHARSET_ARGS=(--charset "$B/charset.txt")
    if grep -q ' ' "$B/charset.txt" && [ "$(manifest fonts_with_space)" = 0 ]; then
        echo "gpu_train: the charset holds the space but no bundled font draws it (rebuild .gpu)" >&2
        exit 2
    fi
fi

check_rc=skipped
if [ "$CHECK" = 1 ]; then
    echo "==> serving check on the shipped weights ($(elapsed) s)"
    rm -rf /tmp/gpu-check && mkdir -p /tmp/gpu-check
    timeout -k 10 "${CHECK_SECONDS:-150}" env PYTHON="$PY" DURATION="${DURATION:-5}" bash bench/gpu_check.sh /tmp/gpu-check 2>&1 | tee /tmp/gpu-check/gpu_check.log
    check_rc=${PIPESTATUS[0]}
    tar -cf "$OUT/gpu_check.tar" -C /tmp gpu-check
fi

# 150 s: the start-up before --max-minutes' clock starts (imports, the font scan, the real crops,
# the render processes, the step-0 validation) and the closing validation, save and copies.
left=$((DEADLINE - $(elapsed)))
stop=$((left - 25))
MINUTES=${MINUTES:-$($PY -c "print(round(max(0.5, ($left - 150) / 60), 2))")}
rm -f "$OUT"/state.pt.part-*  # a stale part would be appended to this leg's state by gpu_unpack.sh
if [ "$stop" -lt 120 ]; then
    echo "gpu_train: $left s left before DEADLINE: too little to train (CHECK_SECONDS or DEADLINE)" >&2
    exit 3
fi
echo "==> training for $MINUTES minutes, stopped at the latest $stop s from now ($(elapsed) s)"
# The lineage's recipe (training log: v5-space; the point loss alone teaches the rectifier, its
# text mix with long tokens at 0.15; since stop 37 held to the init's readings by distillation
# with its BatchNorm statistics kept, v9-holdbn, which alone kept clean text while learning the
# space), scaled to batch 256 (lr 3e-4, warm-up 300), which keeps 13
# render processes ahead of the GPU. --foreground: SIGTERM to the trainer alone, which saves the
# state after its step and stops its render workers itself.
timeout --foreground -s TERM -k 30 "$stop" \
    $PY -m model.training.cli train --out "$RUN" --init "$INIT" ${CHARSET_ARGS[@]+"${CHARSET_ARGS[@]}"} \
    --stream-workers "${WORKERS:-13}" --stream-seed "${STREAM_SEED:-41}" --stream-mix long_token=0.15 \
    --real "$B/real/iiit5k" "$B/real/svt" "$B/real/ic15" --real-ratio 0.1 --val "$B/real/iiit5k" "$B/real/svt" "$B/real/ic15" \
    --batch-size "${BATCH:-256}" --lr "${LR:-3e-4}" --warmup-steps 300 --total-steps "${TOTAL:-12000}" --min-lr-ratio 0.05 \
    --degrade 0.3 --point-loss 1 --tps-lr-scale 1 --rectifier-points-only --seed 41 --distill "$INIT" --hold-bn-stats \
    --threads 2 --device "$DEVICE" --val-every 2000 --log-every 100 --checkpoint-minutes 2 \
    --max-minutes "$MINUTES" --resume --no-progress 2>&1 | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "==> the hard stop ended training (SIGTERM: the state was saved after the step)"
echo "==> training: exit $rc after $(elapsed) s"

cp "$RUN/last.safetensors" "$OUT/" 2>/dev/null
# state.pt holds the optimiser's moments too (3x the weights): split under the 16 MiB a file may have.
[ -f "$RUN/state.pt" ] && split -b 15m -d "$RUN/state.pt" "$OUT/state.pt.part-"
# Not the state (above), the last weights (beside), a save cut short (*.tmp) or kept validations:
# run.tar must stay under 16 MiB or it, with the config a resume needs, does not come back.
tar -cf "$OUT/run.tar" -C "$RUN" --exclude state.pt --exclude last.safetensors --exclude '*.tmp' --exclude 'step-*' .
ls -la "$OUT"
echo "==> done after $(elapsed) s: training exit $rc, serving check exit $check_rc"
[ "$rc" = 0 ] && { [ "$check_rc" = 0 ] || [ "$check_rc" = skipped ]; }
