"""Faults: failing batches, out-of-memory, and bad weights at start-up.

- A model error fails exactly the requests with a crop in that batch (random fault
  schedules under concurrency); every other request gets its own correct results and the
  worker never restarts.
- Out-of-memory splits the batch and retries (property-tested over batch sizes and
  thresholds, on the CUDA code path too with ``torch.cuda.empty_cache`` observed).
- A deadline or a disconnect leaves no "exception was never retrieved" noise behind.
- Bad weights (missing, truncated, corrupt, wrong format, charset mismatch, unbuildable
  config, NaN) make ``safl serve`` exit 2 with one clear line, before anything listens.
  The default run checks every kind in process and two through ``python -m service
  serve``; ``-m slow`` runs every kind as a subprocess.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import json
import logging
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import render_word
from hardening_support import REPO, assert_error_json, free_port, record_figures, subprocess_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from service_support import assert_matches, encode, expected, gated_predictor, metric, multipart, running_app, settings_for

from model import SAFL, Recognition, SAFLConfig, save_checkpoint
from model.preprocess import preprocess
from service import cli
from service.predictor import Predictor, StartupError

# --- a model that fails on a schedule


class FaultyModel:
    """Wraps the real model; each batch fails (raises, or returns too few results) with probability ``p``.

    Records every call: the crops it held (by pixel fingerprint) and how it ended.
    """

    def __init__(self, model: Any, seed: int, p: float) -> None:
        self.model = model
        self.rng = random.Random(seed)
        self.p = p
        self.calls: list[tuple[list[bytes], str]] = []
        self.lock = threading.Lock()

    def recognize(self, images: torch.Tensor, amp_dtype: torch.dtype | None = None) -> list[Recognition]:
        prints = [fingerprint(row) for row in images]
        with self.lock:
            fault = self.rng.choices(["ok", "raise", "short"], [1 - self.p, self.p / 2, self.p / 2])[0]
            self.calls.append((prints, fault))
        if fault == "raise":
            raise RuntimeError("injected model failure /srv/secret/path")
        results = self.model.recognize(images, amp_dtype=amp_dtype)
        return results[:-1] if fault == "short" else results


def fingerprint(crop: torch.Tensor) -> bytes:
    return hashlib.sha256(crop.contiguous().numpy().tobytes()).digest()


def _unique_images(n: int) -> list[bytes]:
    """``n`` word images with pairwise different pixels."""
    return [encode(render_word(f"w{i}x", (90 + 3 * i, 32))) for i in range(n)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_batch_failures_fail_exactly_their_requests(tiny_checkpoint: Path, tiny_model: SAFL, seed: int) -> None:
    rng = random.Random(seed)
    plan = [rng.randint(1, 3) for _ in range(24)]  # crops per request
    images = _unique_images(sum(plan))
    cfg = tiny_model.config.preprocess
    prints = [fingerprint(preprocess(Image.open(io.BytesIO(b)), cfg)) for b in images]
    assert len(set(prints)) == len(prints)
    want = expected(tiny_model, images)
    requests, at = [], 0
    for n in plan:
        requests.append(list(range(at, at + n)))
        at += n
    predictor = Predictor.load(tiny_checkpoint, "cpu", threads=1)
    faulty = FaultyModel(predictor.model, seed, p=0.35)
    predictor.model = faulty
    settings = settings_for(tiny_checkpoint, max_batch_size=4, max_wait_ms=3.0, warmup=False)
    async with running_app(settings, predictor) as (_app, client):
        replies = await asyncio.gather(*(client.post("/recognize", files=multipart([images[j] for j in idx])) for idx in requests))
        calls = list(faulty.calls)
        faulty.p = 0.0
        after = await client.post("/recognize", files=multipart(images[:2]))
        ready = await client.get("/readyz")
        text = (await client.get("/metrics")).text
    failed_prints = {p for call, fault in calls if fault != "ok" for p in call}
    seen = Counter(p for call, _ in calls for p in call)
    failed_requests = 0
    for idx, r in zip(requests, replies, strict=True):
        mine = {prints[j] for j in idx}
        assert all(seen[p] <= 1 for p in mine)  # no crop ran twice
        if mine & failed_prints:
            failed_requests += 1
            assert r.status_code == 500, r.text
            error = assert_error_json(r)
            assert error["code"] == "inference_failed" and "secret" not in r.text
        else:
            assert r.status_code == 200, r.text
            assert all(seen[p] == 1 for p in mine)
            assert_matches(r.json()["results"], [want[j] for j in idx])
    # The worker carried on through every failure: no restart, still ready, still correct.
    assert ready.status_code == 200 and metric(text, "safl_worker_restarts_total") == 0
    faults = sum(1 for _, fault in calls if fault != "ok")
    assert after.status_code == 200  # the next batch after the failures succeeds
    assert_matches(after.json()["results"], want[:2])
    assert metric(text, "safl_errors_total", reason="inference_failed") == failed_requests
    assert faults >= 1 and failed_requests >= 1, "the schedule injected no fault: pick another seed"
    assert failed_requests < len(requests)
    record_figures(
        "batch_faults",
        seed=seed,
        requests=len(requests),
        batches=len(calls),
        failed_batches=faults,
        failed_requests=failed_requests,
        ok_requests=len(requests) - failed_requests,
    )


# --- out of memory


class OOMModel:
    """Wraps the real model: out of memory above ``limit`` crops, and for the first ``transient`` calls whatever their size."""

    name = "torch"

    def __init__(self, model: Any, limit: int, transient: int = 0) -> None:
        self.model, self.limit, self.transient = model, limit, transient
        self.calls: list[tuple[int, bool]] = []  # (size, succeeded)

    def recognize(self, images: torch.Tensor, amp_dtype: torch.dtype | None = None) -> list[Recognition]:
        n = int(images.shape[0])
        if self.transient > 0 or n > self.limit:
            self.transient -= 1
            self.calls.append((n, False))
            raise torch.OutOfMemoryError(f"injected: CUDA out of memory on {n} crops")
        self.calls.append((n, True))
        return self.model.recognize(images, amp_dtype=amp_dtype)


@pytest.fixture(scope="module")
def crops(tiny_model: SAFL) -> list[torch.Tensor]:
    cfg = tiny_model.config.preprocess
    return [preprocess(render_word(f"oom{i}", (80 + 5 * i, 32)), cfg) for i in range(16)]


@pytest.fixture(scope="module")
def full_batch(tiny_model: SAFL, crops: list[torch.Tensor]) -> list[Recognition]:
    return tiny_model.recognize(torch.stack(crops))


@pytest.fixture(scope="module")
def tiny_info(tiny_checkpoint: Path) -> Any:
    return Predictor.load(tiny_checkpoint, "cpu", threads=1).info


def _runs_out_of_memory(n: int, limit: int, transient: int) -> bool:
    """Whether splitting ends at a single crop that still does not fit (mirrors OOMModel and the halving)."""
    left = transient

    def fits(k: int) -> bool:
        nonlocal left
        if left > 0 or k > limit:
            left -= 1
            return k > 1 and fits(k // 2) and fits(k - k // 2)
        return True

    return not fits(n)


@given(n=st.integers(1, 16), limit=st.integers(0, 16), transient=st.integers(0, 3), cuda=st.booleans())
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_out_of_memory_splits_and_retries(
    tiny_info: Any, tiny_model: SAFL, crops: list[torch.Tensor], full_batch: list[Recognition], n: int, limit: int, transient: int, cuda: bool
) -> None:
    model = OOMModel(tiny_model, limit, transient)
    # cuda=True runs the CUDA branch (empty_cache between retries) with CPU tensors: a simulated CUDA OOM.
    predictor = Predictor(model, tiny_info, torch.device("cuda" if cuda else "cpu"))
    batch = torch.stack(crops[:n])
    empty_cache: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "empty_cache", lambda: empty_cache.append(1))
        if _runs_out_of_memory(n, limit, transient):
            # Out of memory even for a single crop: the error reaches the batcher (which answers 503).
            with pytest.raises(torch.OutOfMemoryError):
                predictor._recognize(batch)
            return
        results = predictor._recognize(batch)
    assert len(results) == n
    for got, want in zip(results, full_batch[:n], strict=True):
        assert got.text == want.text and got.confidence == pytest.approx(want.confidence, rel=1e-4, abs=1e-30)
    ok = [size for size, succeeded in model.calls if succeeded]
    failed = [size for size, succeeded in model.calls if not succeeded]
    assert sum(ok) == n and all(size <= limit for size in ok)  # every crop exactly once, in batches that fit
    assert len(model.calls) <= 2 * n - 1  # a binary split tree with at most n leaves: bounded retries
    assert all(size > 1 for size in failed)  # a failed single crop would have been the end
    assert len(empty_cache) == (len(failed) if cuda else 0)


@pytest.mark.anyio
async def test_out_of_memory_in_a_shared_batch_splits_and_every_request_succeeds(tiny_checkpoint: Path, tiny_model: SAFL) -> None:
    images = _unique_images(8)
    want = expected(tiny_model, images)
    predictor, gated = gated_predictor(tiny_checkpoint)
    settings = settings_for(tiny_checkpoint, max_batch_size=8, max_wait_ms=50.0)
    async with running_app(settings, predictor) as (_app, client):
        gated.calls.clear()
        gated.oom_above = 1  # only single crops fit: 8 → 4+4 → 2+2+2+2 → 1 x 8
        plan = [[0, 1, 2], [3], [4, 5], [6, 7]]
        replies = await asyncio.gather(*(client.post("/recognize", files=multipart([images[j] for j in idx])) for idx in plan))
        gated.oom_above = None
        text = (await client.get("/metrics")).text
    for idx, r in zip(plan, replies, strict=True):
        assert r.status_code == 200, r.text
        assert_matches(r.json()["results"], [want[j] for j in idx])
    assert gated.calls.count(1) == 8 and max(gated.calls) >= 2  # it split, down to single crops
    assert metric(text, "safl_errors_total", reason="out_of_memory") == 0


# --- deadlines and disconnects leave no asyncio noise


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.anyio
async def test_deadline_leaves_no_unretrieved_future_exception(tiny_checkpoint: Path) -> None:
    # Each request that times out (or whose client leaves) used to log asyncio's
    # "_GatheringFuture exception was never retrieved" at ERROR level.
    images = _unique_images(3)
    predictor, gated = gated_predictor(tiny_checkpoint)
    records = _Records()
    logging.getLogger("asyncio").addHandler(records)
    try:
        async with running_app(settings_for(tiny_checkpoint, max_batch_size=1), predictor) as (_app, client):
            gated.close_gate(forget_calls=False)
            held = asyncio.create_task(client.post("/recognize", files=multipart(images[:1])))
            while not gated.entered.is_set():
                await asyncio.sleep(0.005)
            late = await client.post("/recognize", files=multipart(images[1:3]), headers={"X-Request-Timeout-Ms": "50"})
            gated.gate.set()
            assert (await held).status_code == 200
            await asyncio.sleep(0.05)
            gc.collect()
            await asyncio.sleep(0.01)
    finally:
        logging.getLogger("asyncio").removeHandler(records)
    assert late.status_code == 504
    assert not records.messages, records.messages


# --- bad weights at start-up


def _copy(src: Path, dst_dir: Path, name: str) -> Path:
    dst = dst_dir / f"{name}.safetensors"
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


def _edit_sidecar(weights: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    sidecar = weights.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    edit(meta)
    sidecar.write_text(json.dumps(meta))


def _rehash(weights: Path) -> None:
    """Make the sidecar's sha256 match whatever the weights file now holds (hides a swap from the hash check)."""
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    _edit_sidecar(weights, lambda m: m.__setitem__("sha256", sha))


def _set_charset(charset: str) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        meta["config"]["charset"] = charset
        meta["charset"] = charset

    return edit


def _nan_checkpoint(dst: Path) -> Path:
    torch.manual_seed(0)
    model = SAFL(SAFLConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        next(iter(model.parameters())).fill_(float("nan"))
    return save_checkpoint(model, dst, name="diverged").weights_path


def _build_bad_weights(kind: str, src: Path, d: Path) -> Path:
    """One broken checkpoint of the given kind, under ``d``."""
    if kind == "missing":
        return d / "nowhere" / "safl.safetensors"
    if kind == "missing_sidecar":
        w = _copy(src, d, kind)
        w.with_suffix(".json").unlink()
        return w
    if kind == "empty_dir":
        (d / kind).mkdir()
        return d / kind
    w = _copy(src, d, kind)
    data = w.read_bytes()
    if kind == "truncated":
        w.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_rehashed":  # a truncated file whose sidecar was regenerated: the parser must catch it
        w.write_bytes(data[: len(data) // 2])
        _rehash(w)
    elif kind == "bit_flip":
        w.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    elif kind == "wrong_format_png":
        w.write_bytes(encode(render_word("not weights")))
        _rehash(w)
    elif kind == "wrong_format_pickle":
        torch.save({"state": torch.zeros(3)}, w)
        _rehash(w)
    elif kind == "sidecar_not_json":
        w.with_suffix(".json").write_text("{this is not json")
    elif kind == "sidecar_wrong_format":
        _edit_sidecar(w, lambda m: m.__setitem__("format", "something-else"))
    elif kind == "charset_longer":  # the sidecar names more characters than the weights were trained for
        _edit_sidecar(w, _set_charset(SAFLConfig().charset + "äöü"))
    elif kind == "charset_field_mismatch":  # the sidecar's two charset fields disagree
        _edit_sidecar(w, lambda m: m.__setitem__("charset", "abc"))
    elif kind == "config_zero_width":
        _edit_sidecar(w, lambda m: m["config"].__setitem__("d_model", 0))
    elif kind == "config_negative":
        _edit_sidecar(w, lambda m: m["config"].__setitem__("d_model", -8))
    elif kind == "nan_weights":
        w.unlink()
        w.with_suffix(".json").unlink()
        return _nan_checkpoint(w)
    else:
        raise ValueError(kind)
    return w


#: kind → a phrase the one-line error must contain.
BAD_WEIGHTS: dict[str, str] = {
    "missing": "not found",
    "missing_sidecar": "sidecar not found",
    "empty_dir": "holds 0 .safetensors",
    "truncated": "corrupt, truncated",
    "truncated_rehashed": "could not read weights",
    "bit_flip": "corrupt, truncated",
    "wrong_format_png": "could not read weights",
    "wrong_format_pickle": "could not read weights",
    "sidecar_not_json": "not valid JSON",
    "sidecar_wrong_format": "not a safl checkpoint",
    "charset_longer": "charset of",
    "charset_field_mismatch": "charset field does not match",
    "config_zero_width": "building the model failed",
    "config_negative": "building the model failed",
    "nan_weights": "NaN or infinite",
}


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-weights")
    return {kind: _build_bad_weights(kind, tiny_checkpoint, d) for kind in BAD_WEIGHTS}


@pytest.mark.parametrize("kind", list(BAD_WEIGHTS))
def test_bad_weights_fail_serve_with_one_clear_line(
    kind: str, bad_weights: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_serve(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"safl serve started a server on bad weights ({kind})")

    monkeypatch.setattr(cli.GracefulServer, "run", must_not_serve)
    assert cli.main(["serve", "--weights", str(bad_weights[kind]), "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("safl serve: "), err
    assert BAD_WEIGHTS[kind] in err and "Traceback" not in err


def test_same_length_charset_swap_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # A sidecar whose charset was replaced by another of the same length would serve wrong
    # characters: the config stored in the weights' header (covered by the sha256) catches it.
    w = _copy(tiny_checkpoint, tmp_path, "swapped")
    _edit_sidecar(w, _set_charset(SAFLConfig().charset[::-1]))
    with pytest.raises(StartupError):
        Predictor.load(w, "cpu")


def _serve_subprocess(weights: Path, timeout: float = 60.0) -> tuple[int, str, float, int]:
    """``python -m service serve --weights WEIGHTS``: (exit code, output, seconds, port)."""
    port = free_port()
    cmd = [sys.executable, "-m", "service", "serve", "--weights", str(weights), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, check=False)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0, port


def _check_refused(kind: str, code: int, output: str, seconds: float, port: int) -> None:
    lines = [line for line in output.splitlines() if line.startswith("safl serve: ")]
    assert code == 2, output
    # One line saying what is wrong, last (a library warning may come before it).
    assert len(lines) == 1 and BAD_WEIGHTS[kind] in lines[0] and output.rstrip().endswith(lines[0]), output
    assert "Traceback" not in output and "Uvicorn running" not in output
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", port))  # nothing ever listened
    assert seconds < 30  # in practice: interpreter + imports, ~3 s


@pytest.mark.parametrize("kind", ["truncated", "nan_weights"])
def test_bad_weights_subprocess(kind: str, bad_weights: dict[str, Path]) -> None:
    code, output, seconds, port = _serve_subprocess(bad_weights[kind])
    _check_refused(kind, code, output, seconds, port)


@pytest.mark.slow
def test_bad_weights_subprocess_every_kind(bad_weights: dict[str, Path]) -> None:
    times = {}
    for kind, path in bad_weights.items():
        code, output, seconds, port = _serve_subprocess(path)
        _check_refused(kind, code, output, seconds, port)
        times[kind] = round(seconds, 2)
    record_figures("bad_weights_subprocess", kinds=len(times), max_exit_seconds=max(times.values()), seconds=times)
