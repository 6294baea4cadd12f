#!/usr/bin/env bash
# The GPU path in one command (under 5 minutes): serve the shipped weights on CUDA with bf16,
# drive the load benchmark, force an out-of-memory split, and print served throughput as a
# fraction of offline batched throughput on the same GPU (goal: at least 0.8).
# DURATION (default 20) sets the seconds of each served load level.
#
#     bash bench/gpu_check.sh [OUT_DIR]        # default OUT_DIR: docs/results/gpu
#
# Without CUDA it stops at once with one line and exit status 2. PYTHON (default python3) names
# the interpreter. Each part runs whatever the others did; the exit status is 1 when one failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-docs/results/gpu}"
PY=${PYTHON:-python3}

err=$(mktemp)
trap 'rm -f "$err"' EXIT
if ! cuda=$($PY -c 'import torch; print(torch.cuda.is_available())' 2>"$err"); then
    echo "gpu_check: $PY cannot import torch: $(tail -n 1 "$err")" >&2
    exit 2
fi
if [ "$cuda" != True ]; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with a GPU and a CUDA build of torch" >&2
    exit 2
fi
mkdir -p "$out"
weights="${SAFL_WEIGHTS:-weights/safl.safetensors}"
failed=()
$PY -c 'import torch; print("==> GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

echo "==> offline: the model alone, bf16, batches 32-256"
$PY bench/model_speed.py --device cuda --amp bf16 --weights "$weights" --typical-len 0 --batches 32 64 128 256 --repeats 10 --json "$out/offline.json" | tee "$out/offline.md" || failed+=(offline)

echo "==> served: safl serve --device cuda --bf16, 64 and 128 concurrent clients, one crop per request"
$PY bench/service_load.py --weights "$weights" --device cuda --bf16 --backends torch --batch-sizes 128 --concurrency 64 128 \
    --duration "${DURATION:-20}" --json "$out/served.json" | tee "$out/served.md" || failed+=(served)

echo "==> forced out-of-memory: a 4,096-crop batch in a memory cap the model cannot fit it in"
$PY - "$weights" <<'PY' || failed+=(out-of-memory)
import sys

import torch

from model.preprocess import preprocess
from service.predictor import Predictor
from bench.model_speed import word_image

p = Predictor.load(sys.argv[1], device="cuda", bf16=True, backend="torch")
crop = preprocess(word_image("Station"), p.preprocess_config)
expected = p.recognize([crop])[0].text
torch.cuda.empty_cache()
free, total = torch.cuda.mem_get_info()
used = torch.cuda.memory_allocated()
torch.cuda.set_per_process_memory_fraction(min(1.0, (used + 256 * 2**20) / total))  # 256 MiB above the weights
results = p.recognize([crop] * 4096)
ok = len(results) == 4096 and all(r.text == expected for r in results)
print(f"forced OOM split: {'PASS' if ok else 'FAIL'} ({len(results)} results, all '{expected}': {ok}; see the 'retrying as' warnings above)")
sys.exit(0 if ok else 1)
PY

$PY - "$out" <<'PY' || failed+=(ratio)
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
offline = max(r["crops_per_s"] for r in json.loads((out / "offline.json").read_text())["rows"])
served = max(r["crops_per_s"] for r in json.loads((out / "served.json").read_text())["results"])
print(f"served {served:.0f} crops/s / offline {offline:.0f} crops/s = {served / offline:.2f} (goal >= 0.8): {'MET' if served >= 0.8 * offline else 'NOT MET'}")
PY
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: failed: ${failed[*]}" >&2
    exit 1
fi
