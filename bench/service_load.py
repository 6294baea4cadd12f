"""Load generator for the recognition service: throughput and latency, batching on vs off.

One command starts the server(s) itself (``python -m service serve`` on free local
ports), waits for ``/readyz``, drives a bounded number of concurrent clients at each
concurrency level for a fixed time, and prints a table (``--json`` also writes it)::

    python bench/service_load.py --tiny                      # untrained tiny model, short run
    python bench/service_load.py --weights weights/safl.safetensors --concurrency 1 8 32 64 --duration 10
    python bench/service_load.py --url http://127.0.0.1:8000  # an already running server
    python bench/service_load.py --data ../shared/data/train/ic15 --backends onnx torch --batch-sizes 32 --concurrency 32

``--data`` sends real crops (the files of a ``labels.tsv`` folder) instead of rendered
words; ``--backends`` starts one server per inference engine (``safl serve --backend``).
For servers it starts, the table also gives the server's resident memory (RSS) at the end
of each level, and ``rss_start_mb`` in the JSON at its start: a long ``--duration`` at one
level is the soak test for memory growth.

Each client sends one request at a time (closed loop), so at most ``concurrency``
requests are ever outstanding. Latency is measured at the client, arrival of the last
response byte included. The mean batch size comes from the server's own
``safl_batch_size`` histogram over the level.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = REPO / "weights" / "safl.safetensors"
WORDS = ["hello", "World", "street", "CAFE", "exit", "open24", "Parking", "sale!"]


@dataclass
class LevelResult:
    """One (server, concurrency) measurement."""

    label: str
    max_batch_size: int | None
    concurrency: int
    seconds: float
    requests: int
    errors: dict[str, int] = field(default_factory=dict)
    throughput_rps: float = 0.0
    crops_per_s: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    mean_batch: float | None = None
    rss_start_mb: float | None = None
    rss_end_mb: float | None = None
    #: The server's RSS every tenth of the level (a soak's growth curve).
    rss_samples_mb: list[float] = field(default_factory=list)


def _word_png(text: str) -> bytes:
    img = Image.new("L", (24 + 14 * len(text), 32), 255)
    ImageDraw.Draw(img).text((4, 4), text, fill=0, font=ImageFont.load_default(size=22))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def _batch_stats(metrics_text: str) -> tuple[float, float]:
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("safl_batch_size_sum "):
            total = float(line.split()[1])
        elif line.startswith("safl_batch_size_count "):
            count = float(line.split()[1])
    return total, count


def load_payloads(folder: Path | None, limit: int = 256) -> list[bytes]:
    """Encoded crops to send: the first ``limit`` files of ``folder``'s ``labels.tsv``, or
    rendered words without a folder."""
    if folder is None:
        return [_word_png(w) for w in WORDS]
    lines = (folder / "labels.tsv").read_text(encoding="utf-8").splitlines()
    return [(folder / line.split("\t", 1)[0]).read_bytes() for line in lines[:limit] if "\t" in line]


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except psutil.Error:
        return None


async def run_level(
    url: str,
    label: str,
    max_batch: int | None,
    concurrency: int,
    seconds: float,
    files_per_request: int,
    api_key: str | None,
    payloads: list[bytes],
    pid: int | None = None,
) -> LevelResult:
    """Drive ``concurrency`` closed-loop clients for ``seconds``; returns the level's numbers
    (with the resident memory of the server process ``pid`` at start and end, when given)."""
    rss_start = _rss_mb(pid)
    headers = {"X-API-Key": api_key} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60, headers=headers) as client:
        before = _batch_stats((await client.get("/metrics")).text)
        start = time.perf_counter()
        stop_at = start + seconds

        async def worker(seed: int) -> None:
            i = seed
            while time.perf_counter() < stop_at:
                files = [("files", (f"w{i}_{k}.png", payloads[(i + k) % len(payloads)], "image/png")) for k in range(files_per_request)]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/recognize", files=files)
                    key = None if r.status_code == 200 else str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                if key is None:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[key] = errors.get(key, 0) + 1
                i += concurrency

        samples: list[float] = []

        async def sample_rss() -> None:
            while pid is not None and time.perf_counter() < stop_at:
                await asyncio.sleep(max(seconds / 10, 0.5))
                rss = _rss_mb(pid)
                if rss is not None:
                    samples.append(rss)

        await asyncio.gather(sample_rss(), *(worker(s) for s in range(concurrency)))
        elapsed = time.perf_counter() - start
        after = _batch_stats((await client.get("/metrics")).text)
    latencies.sort()
    batches = after[1] - before[1]
    return LevelResult(
        label=label,
        max_batch_size=max_batch,
        concurrency=concurrency,
        seconds=round(elapsed, 3),
        requests=len(latencies),
        errors=errors,
        throughput_rps=len(latencies) / elapsed,
        crops_per_s=len(latencies) * files_per_request / elapsed,
        p50_ms=_percentile(latencies, 50) * 1000,
        p95_ms=_percentile(latencies, 95) * 1000,
        p99_ms=_percentile(latencies, 99) * 1000,
        mean_batch=(after[0] - before[0]) / batches if batches else None,
        rss_start_mb=rss_start,
        rss_end_mb=_rss_mb(pid),
        rss_samples_mb=samples,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_checkpoint(folder: Path) -> Path:
    import torch

    sys.path.insert(0, str(REPO))
    from model import SAFL, SAFLConfig, save_checkpoint

    torch.manual_seed(0)
    path = folder / "tiny.safetensors"
    save_checkpoint(SAFL(SAFLConfig.from_preset("tiny")).eval(), path, name="safl-tiny")
    return path


class ServerProcess:
    """``python -m service serve`` on a free port; stopped with SIGTERM (graceful) on exit."""

    def __init__(self, weights: Path, max_batch: int, args: argparse.Namespace, backend: str = "auto") -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--weights",
            str(weights),
            "--port",
            str(self.port),
            "--max-batch-size",
            str(max_batch),
            "--max-wait-ms",
            str(args.max_wait_ms),
            "--max-queue",
            "4096",
            "--max-files",
            str(max(64, args.files_per_request)),
            "--log-level",
            "warning",
            "--device",
            args.device,
            "--backend",
            backend,
        ]
        if args.server_threads:
            self.cmd += ["--threads", str(args.server_threads)]
        if args.bf16:
            self.cmd += ["--bf16"]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k != "SAFL_API_KEY"}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit("server did not become ready in 120 s")

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def print_table(results: list[LevelResult]) -> None:
    """Human-readable table of all levels."""
    head = f"{'server':<20} {'conc':>4} {'req':>6} {'err':>4} {'req/s':>8} {'crops/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'batch':>6} {'RSS MB':>7}"
    print(head)
    print("-" * len(head))
    for r in results:
        batch = f"{r.mean_batch:.1f}" if r.mean_batch is not None else "-"
        rss = f"{r.rss_end_mb:.0f}" if r.rss_end_mb is not None else "-"
        print(
            f"{r.label:<20} {r.concurrency:>4} {r.requests:>6} {sum(r.errors.values()):>4} {r.throughput_rps:>8.1f} {r.crops_per_s:>8.1f} "
            f"{r.p50_ms:>8.1f} {r.p95_ms:>8.1f} {r.p99_ms:>8.1f} {batch:>6} {rss:>7}"
        )


async def bench_url(url: str, label: str, max_batch: int | None, args: argparse.Namespace, pid: int | None = None) -> list[LevelResult]:
    """All concurrency levels against one server (``pid``: its process, for RSS)."""
    payloads = load_payloads(args.data)
    out = []
    for c in args.concurrency:
        if args.warmup_s > 0:
            await run_level(url, label, max_batch, c, args.warmup_s, args.files_per_request, args.api_key, payloads)
        out.append(await run_level(url, label, max_batch, c, args.duration, args.files_per_request, args.api_key, payloads, pid))
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", help="bench this running server instead of starting servers")
    src.add_argument("--weights", type=Path, help=f"checkpoint for the started servers (default: {DEFAULT_WEIGHTS})")
    src.add_argument("--tiny", action="store_true", help="start servers with a freshly made untrained tiny model")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1], help="max_batch_size per started server (default: 32 1 = on vs off)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level (default: 1 8 32)")
    p.add_argument("--duration", type=float, default=2.0, help="measured seconds per level (default: 2)")
    p.add_argument("--warmup-s", type=float, default=0.3, help="unmeasured seconds before each level (default: 0.3)")
    p.add_argument("--files-per-request", type=int, default=1)
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="server batching window of an idle model (default: 0, the server default)")
    p.add_argument("--server-threads", type=int, default=None, help="--threads for the started servers")
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true", help="start the servers with --bf16 (CUDA)")
    p.add_argument("--api-key", default=os.environ.get("SAFL_API_KEY"), help="for --url servers that need one")
    p.add_argument("--data", type=Path, metavar="DIR", help="send the crops of this labels.tsv folder (its first 256) instead of rendered words")
    p.add_argument(
        "--backends", nargs="+", choices=("auto", "onnx", "torch"), default=["auto"], help="inference engines of the started servers (default: auto)"
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    results: list[LevelResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            results = asyncio.run(bench_url(args.url.rstrip("/"), "external", None, args))
        else:
            weights = _tiny_checkpoint(Path(tmp)) if args.tiny else (args.weights or DEFAULT_WEIGHTS)
            if not Path(weights).exists():
                p.error(f"weights not found: {weights} (pass --weights PATH, --tiny or --url)")
            for backend in args.backends:
                for b in args.batch_sizes:
                    label = f"batch {b}" + (" (off)" if b == 1 else "") + (f" {backend}" if backend != "auto" else "")
                    with ServerProcess(Path(weights), b, args, backend) as server:
                        assert server.proc is not None
                        results += asyncio.run(bench_url(server.url, label, b, args, server.proc.pid))
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "results": [asdict(r) for r in results]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
