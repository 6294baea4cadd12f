#!/usr/bin/env bash
# The training campaign (issue 5): two runs identical but for the loss, focal (γ=2, the
# shipped model) and cross entropy, side by side on one thread each. Every piece is
# resumable: run it again after any interruption and it continues where it stopped.
#   MINUTES=120 bash scripts/campaign.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REAL=${REAL:-../shared/data/train}
MINUTES=${MINUTES:-60}
SEED=${SEED:-0}
mkdir -p runs
# Deterministic: a fresh machine re-renders the very same crops; finished shards are kept.
python -m model.training.cli synth --out data/synth --count 500000 --seed 0 --no-progress
common=(--preset small --synth data/synth
        --real "$REAL/iiit5k" "$REAL/svt" "$REAL/ic15" --real-ratio 0.2
        --val "$REAL/iiit5k" "$REAL/svt" "$REAL/ic15" --val-fraction 0.3 --split-seed 0
        --batch-size 64 --lr 5e-4 --warmup-steps 1000 --total-steps 60000 --seed "$SEED"
        --threads 1 --val-every 1000 --checkpoint-minutes 5 --max-minutes "$MINUTES" --resume --no-progress)
python -m model.training.cli train --out "runs/small-focal-s$SEED" --loss focal --gamma 2 "${common[@]}" >> "runs/small-focal-s$SEED.out" 2>&1 &
python -m model.training.cli train --out "runs/small-ce-s$SEED" --loss ce "${common[@]}" >> "runs/small-ce-s$SEED.out" 2>&1 &
wait
