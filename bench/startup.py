"""Start-up time of the ``safl`` command: where a one-image ``safl recognize`` spends it.

    python bench/startup.py                           # examples/ crop, shipped weights, 5 runs each
    python bench/startup.py --image word.png --runs 3 --json startup.json

Times, wall clock, each a fresh process as a shell loop starts them (median of ``--runs``):

- ``safl --help``;
- ``safl recognize IMAGE`` with an empty graph cache (the ONNX graphs exported, then kept);
- ``safl recognize IMAGE`` with the graphs cached (every later call): the target is 2 s;
- the same with ``--backend torch`` (PyTorch, no ONNX graphs), for comparison;

then the modules that take longest to import in the cached call (``python -X importtime``),
which says where the rest of the time goes. The cache is a temporary folder
(``SAFL_CACHE_DIR``), so the user's own is neither used nor touched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAFL = [sys.executable, "-m", "service"]
DEFAULT_IMAGE = REPO / "examples" / "word.png"


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall-clock seconds of one process, and its result (an error if it failed)."""
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")
    return took, out


def slowest_imports(cmd: list[str], env: dict[str, str], top: int) -> list[tuple[str, float]]:
    """The ``top`` top-level imports by cumulative seconds, from ``python -X importtime``."""
    _, out = run([sys.executable, "-X", "importtime", *cmd[1:]], env)
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        if cumulative.isdigit() and not name.startswith(" ") and "." not in name.strip():
            rows.append((name.strip(), int(cumulative) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="the crop to read (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=5, help="processes per measurement; the median is reported")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="safl-startup-") as cache:
        env = {**os.environ, "SAFL_CACHE_DIR": cache}
        recognize = [*SAFL, "recognize", str(args.image)]
        times: dict[str, list[float]] = {"safl --help": [run([*SAFL, "--help"], env)[0] for _ in range(args.runs)]}
        took, first = run(recognize, env)  # exports the graphs into the empty cache
        times["safl recognize, graphs not yet cached (export)"] = [took]
        times["safl recognize, graphs cached"] = [run(recognize, env)[0] for _ in range(args.runs)]
        times["safl recognize --backend torch"] = [run([*recognize, "--backend", "torch"], env)[0] for _ in range(args.runs)]
        imports = slowest_imports(recognize, env, 8)

    medians = {name: statistics.median(values) for name, values in times.items()}
    width = max(map(len, medians))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, median of {args.runs}")
    for name, seconds in medians.items():
        print(f"  {name:<{width}}  {seconds:6.2f} s")
    print(f"  reading: {first.stdout.strip()}")
    print("slowest imports of the cached call (cumulative):")
    for name, seconds in imports:
        print(f"  {name:<24} {seconds:6.3f} s")
    if args.json:
        args.json.write_text(json.dumps({"seconds": medians, "runs": times, "imports": dict(imports), "reading": first.stdout.strip()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
