#!/usr/bin/env bash
# One leg of the GPU campaign, run on a lent GPU machine (16 cores, no network) from the
# repository root, with `.gpu/` (built by scripts/gpu_bundle.py) carried along.
#
# The focal arm (the shipped model) and its CE twin train in lockstep on the same
# batches: synthetic crops rendered on the fly by 13 processes plus real fine-tune crops.
# The run state lives in runs/gpu-* (kept while the machine stays warm, so the next leg
# resumes exactly); if the machine was given back in between, the next leg starts from
# the last weights that came back (.gpu/init/*.safetensors).
#   MINUTES=8 bash scripts/gpu_train.sh      # writes checkpoints and logs to $OUT
#
# Session 2 (the shipped safl-small@a659eaef27c4) ran three legs with FOCAL_INIT=weights/safl.safetensors
# (the then-shipped step-8,000 model), CE_INIT=.gpu/init/ce.safetensors and TOTAL=30000, 14000, 14500.
# A new campaign: pick new RUN names (the state in runs/$RUN-* is resumed), the inits, and the
# schedule; FOCAL_INIT= (empty) trains from scratch with PRESET. Without CE_INIT the CE twin
# starts from the focal arm's init, the cleanest comparison.
set -uo pipefail
MINUTES=${MINUTES:-8}
TOTAL=${TOTAL:-30000}
RUN=${RUN:-gpu}
OUT=${OUT:-runs/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu/shim PYTHONUNBUFFERED=1
mkdir -p /usr/share/fonts/truetype/safl-bundle /usr/share/backgrounds/safl-bundle
cp -n .gpu/fonts/* /usr/share/fonts/truetype/safl-bundle/
cp -n .gpu/backgrounds/* /usr/share/backgrounds/safl-bundle/
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cores', __import__('os').cpu_count())"

REAL=.gpu/real
init=()
[ -n "${FOCAL_INIT-.gpu/init/focal.safetensors}" ] && init=(--init "${FOCAL_INIT-.gpu/init/focal.safetensors}")
python3 -m model.training.cli train --out "runs/$RUN-focal" "${init[@]}" --preset "${PRESET:-small}" \
    --loss focal --gamma 2 \
    --twin-out "runs/$RUN-ce" --twin-loss ce ${CE_INIT:+--twin-init "$CE_INIT"} \
    --stream-workers "${WORKERS:-13}" --stream-seed "${STREAM_SEED:-1}" \
    --real $REAL/iiit5k $REAL/svt $REAL/ic15 --real-ratio 0.1 \
    --val $REAL/iiit5k $REAL/svt $REAL/ic15 --val-fraction 0.3 --split-seed 0 \
    --batch-size "${BATCH:-384}" --lr "${LR:-7e-4}" --tps-lr-scale 0.1 --warmup-steps "${WARMUP:-500}" --total-steps "$TOTAL" \
    --threads 2 --device "${DEVICE:-cuda}" --val-every 1000 --log-every 100 --checkpoint-minutes 2 \
    --max-minutes "$MINUTES" --resume --no-progress 2>&1 | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}

# Back to the developer's machine: at most 8 files of 16 MiB, so one tar of the small
# files plus the last weights per arm, and the best weights on their own.
for arm in focal ce; do
    d=runs/$RUN-$arm
    [ -f "$d/best.safetensors" ] && cp "$d/best.safetensors" "$OUT/$arm-best.safetensors"
    tar -cf "$OUT/$arm.tar" -C "$d" --exclude state.pt --exclude best.safetensors . 2>/dev/null
done
ls -la "$OUT"
exit "$rc"
