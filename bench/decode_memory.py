"""Peak memory of ``safl serve`` under concurrent requests of large images (issue 30, point 4).

Starts ``python -m service serve`` on a free local port (the shipped model and default
settings unless told otherwise), waits for ``/readyz``, then sends ``--requests`` requests
at once, each of ``--images`` PNGs of ``--megapixels`` million pixels (a word drawn large on
white RGB: it compresses to tens of kB, so many fit in one request under the body limit).
The server's resident memory (RSS, its process and any children) is sampled every 10 ms::

    python bench/decode_memory.py                                  # 16 requests x 4 x 16 Mpx, the defaults
    python bench/decode_memory.py --json docs/results/decode_memory.json
    python bench/decode_memory.py --serve-flag=--decode-memory-mb=64   # any `safl serve` flag

Prints and (``--json``) writes: RSS when ready, its peak during the burst, RSS 3 s after the
last reply, each reply's status and latency, and the limit it is compared with
(``--limit-mb``, the Kubernetes pod's ``limits.memory``). Exit status 1 if the peak passed
the limit or a request got no reply.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent


def big_png(megapixels: float, word: str) -> bytes:
    """A square RGB PNG of about ``megapixels`` million pixels with ``word`` drawn across it."""
    side = int((megapixels * 1e6) ** 0.5)
    img = Image.new("RGB", (side, side), (255, 255, 255))
    font = ImageFont.load_default(size=side // 6)
    ImageDraw.Draw(img).text((side // 20, side // 3), word, fill=(20, 20, 20), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Sampler(threading.Thread):
    """Samples a process's RSS every ``interval`` seconds; ``peak`` in bytes."""

    def __init__(self, proc: psutil.Process, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.proc, self.interval, self.peak, self.stop = proc, interval, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, _rss(self.proc))
            except psutil.NoSuchProcess:
                return
            time.sleep(self.interval)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16, help="requests sent at once (default: %(default)s)")
    ap.add_argument("--images", type=int, default=4, help="images per request (default: %(default)s)")
    ap.add_argument("--megapixels", type=float, default=16.0, help="pixels per image, millions (default: %(default)s, the default SAFL_MAX_PIXELS)")
    ap.add_argument("--weights", type=Path, help="checkpoint to serve (default: the shipped model)")
    ap.add_argument("--serve-flag", action="append", default=[], help="extra `safl serve` flag, e.g. --serve-flag=--timeout-ms=30000 (repeatable)")
    ap.add_argument("--timeout-ms", type=float, help="the server's --timeout-ms (default: its own, 10 s)")
    ap.add_argument("--limit-mb", type=float, default=2048, help="the memory limit to compare with, MiB (default: %(default)s, deploy/k8s limits.memory)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), "--log-level", "warning", *args.serve_flag]
    if args.timeout_ms:
        cmd += ["--timeout-ms", str(args.timeout_ms)]
    if args.weights:
        cmd += ["--weights", str(args.weights)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFL_")} | {"PYTHONPATH": str(REPO)}
    pngs = [big_png(args.megapixels, w) for w in ("hello", "world", "street", "exit")[: args.images]]
    pngs += [pngs[i % len(pngs)] for i in range(len(pngs), args.images)]
    server = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        proc = psutil.Process(server.pid)
        end = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise SystemExit("the server never became ready")
            time.sleep(0.2)
        time.sleep(1.0)
        ready_rss = _rss(proc)
        sampler = Sampler(proc)
        sampler.start()

        def one(i: int) -> tuple[int | str, float]:
            files = [("files", (f"r{i}-{j}.png", b, "image/png")) for j, b in enumerate(pngs)]
            t0 = time.monotonic()
            try:
                r = httpx.post(url + "/recognize", files=files, timeout=(args.timeout_ms or 10_000) / 1000 + 30)
                code: int | str = r.status_code if r.status_code == 200 else f"{r.status_code} {r.json().get('error', {}).get('code')}"
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            return code, time.monotonic() - t0

        t0 = time.monotonic()
        with ThreadPoolExecutor(args.requests) as pool:
            replies = list(pool.map(one, range(args.requests)))
        wall = time.monotonic() - t0
        time.sleep(3.0)
        after_rss = _rss(proc)
        sampler.stop.set()
        sampler.join()
    finally:
        server.terminate()
        server.wait(timeout=60)
    mb = 2**20
    statuses: dict[str, int] = {}
    for code, _ in replies:
        statuses[str(code)] = statuses.get(str(code), 0) + 1
    latencies = sorted(t for _, t in replies)
    result = {
        "requests": args.requests,
        "images_per_request": args.images,
        "megapixels": args.megapixels,
        "request_bytes": sum(len(b) for b in pngs),
        "serve_flags": args.serve_flag,
        "rss_ready_mb": round(ready_rss / mb, 1),
        "rss_peak_mb": round(sampler.peak / mb, 1),
        "rss_after_mb": round(after_rss / mb, 1),
        "limit_mb": args.limit_mb,
        "statuses": statuses,
        "latency_s": {"min": round(latencies[0], 2), "median": round(latencies[len(latencies) // 2], 2), "max": round(latencies[-1], 2)},
        "wall_s": round(wall, 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    answered = all(isinstance(code, int) or code[:3].isdigit() for code, _ in replies)
    return 0 if answered and sampler.peak / mb <= args.limit_mb else 1


if __name__ == "__main__":
    raise SystemExit(main())
