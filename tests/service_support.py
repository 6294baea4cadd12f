"""Helpers for the service tests: run an app (ASGI or real uvicorn), encode images, read metrics.

The model is always the real tiny SAFL; ``GatedModel`` only wraps it to hold, fail or
count batches (fault injection), it never replaces its output.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from model import SAFL, Recognition
from model.preprocess import ViewConfig
from service import Settings, create_app
from service.predictor import Predictor
from service.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env() -> dict[str, str]:
    """The environment for a server subprocess: no inherited SAFL_* settings but the session's
    graph cache (conftest's ``onnx_cache_dir``), this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFL_") or k == "SAFL_CACHE_DIR"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def wait_process_ready(url: str, proc: subprocess.Popen, timeout: float, output: Callable[[], str] = lambda: "") -> None:
    """Poll ``url``/readyz until 200; fail with the server's ``output()`` if it exits or never gets ready."""
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}: {output()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > end:
            raise AssertionError(f"server never became ready: {output()[-3000:]}")
        time.sleep(0.1)


#: One model input per crop: the batching and overload tests count inputs as crops. The
#: tests of the views themselves turn them on.
ONE_VIEW = ViewConfig(turn_tall=False, contrast=False)


def settings_for(checkpoint: Path, **overrides: Any) -> Settings:
    """Test settings: CPU, one thread, small batches, a short batching window, ``ONE_VIEW``."""
    values: dict[str, Any] = {
        "weights": checkpoint,
        "device": "cpu",
        "threads": 1,
        "max_batch_size": 8,
        "max_wait_ms": 2.0,
        "turn_tall": ONE_VIEW.turn_tall,
        "contrast_views": ONE_VIEW.contrast,
    }
    values.update(overrides)
    return Settings(**values)


def encode(img: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    """An image file's bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def expected(model: SAFL, files: list[bytes], view_cfg: ViewConfig = ONE_VIEW) -> list[Recognition]:
    """What the model itself says about these files (decoded by Pillow, shared preprocessing)."""
    return model.recognize_images([Image.open(io.BytesIO(b)) for b in files], view_cfg)


def assert_matches(results: list[dict[str, Any]], want: list[Recognition]) -> None:
    """Service results equal the model's own (texts exactly; floats up to batch-size rounding)."""
    assert len(results) == len(want)
    for got, ref in zip(results, want, strict=True):
        assert got["text"] == ref.text
        assert got["confidence"] == _approx(ref.confidence)
        assert got["char_confidences"] == [_approx(c) for c in ref.char_confidences]


def _approx(x: float) -> Any:
    import pytest

    return pytest.approx(x, rel=1e-4, abs=1e-30)


def multipart(files: list[bytes], names: list[str] | None = None) -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx ``files=`` for a list of image bytes."""
    names = names or [f"img{i}.png" for i in range(len(files))]
    return [("files", (n, b, "application/octet-stream")) for n, b in zip(names, files, strict=True)]


def metric(text: str, sample_name: str, **labels: str) -> float:
    """Sum of the samples called ``sample_name`` whose labels include ``labels``, from /metrics text."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class GatedModel:
    """Wraps the real model: records batch sizes, can hold batches at a gate or fail them."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[int] = []
        self.fail_next: BaseException | None = None
        self.oom_above: int | None = None

    def close_gate(self, forget_calls: bool = True) -> None:
        """Hold the next batch at the gate (and forget what ran so far): ``entered`` is set when it arrives."""
        if forget_calls:
            self.calls.clear()
        self.gate.clear()
        self.entered.clear()

    def recognize(self, images: torch.Tensor, amp_dtype: torch.dtype | None = None) -> list[Recognition]:
        self.calls.append(int(images.shape[0]))
        self.entered.set()
        if not self.gate.wait(timeout=20):
            raise RuntimeError("test gate never opened")
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if self.oom_above is not None and images.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return self.model.recognize(images, amp_dtype=amp_dtype)


def gated_predictor(checkpoint: Path) -> tuple[Predictor, GatedModel]:
    """A real loaded predictor whose model sits behind a ``GatedModel``."""
    predictor = Predictor.load(checkpoint, "cpu", threads=1)
    gated = GatedModel(predictor.model)
    predictor.model = gated
    return predictor, gated


async def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll an (async or sync) predicate until true."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def wait_ready(client: httpx.AsyncClient, timeout: float = 20.0) -> None:
    """Poll /readyz until 200."""

    async def ready() -> bool:
        return (await client.get("/readyz")).status_code == 200

    await wait_until(ready, timeout, 0.02)


@asynccontextmanager
async def running_app(
    settings: Settings, predictor: Predictor | None = None, ready: bool = True, raise_app_exceptions: bool = True
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running and an HTTP client speaking to it over ASGI."""
    app = create_app(settings, predictor=predictor)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
            if ready:
                await wait_ready(client)
            yield app, client


def runtime_of(app: FastAPI) -> Runtime:
    """The app's runtime container."""
    return app.state.runtime


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """A real uvicorn server for ``app`` on 127.0.0.1 in a thread; yields its base URL once ready."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 20
        while True:
            try:
                if server.started and httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end or not thread.is_alive():
                raise RuntimeError("test server did not become ready")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def slow_server_script(path: Path, **settings: object) -> Path:
    """Write a script that runs the real GracefulServer (``safl serve``) on the checkpoint and
    port given as its arguments, with a model that takes 1 s a batch, so requests are in the
    model and queued behind it when a signal comes; ``settings`` go into its ``Settings``.
    Returns ``path``."""
    extra = "".join(f", {k}={v!r}" for k, v in settings.items())
    path.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from service import Settings
            from service.cli import serve
            from service.predictor import Predictor

            class Slow:
                def __init__(self, model):
                    self.model = model
                def recognize(self, images, amp_dtype=None):
                    time.sleep(1.0)
                    return self.model.recognize(images, amp_dtype=amp_dtype)

            settings = Settings(weights=sys.argv[1], port=int(sys.argv[2]), device="cpu", threads=1, warmup=False{extra})
            predictor = Predictor.load(settings.weights, "cpu", threads=1)
            predictor.model = Slow(predictor.model)
            raise SystemExit(serve(settings, predictor))
            """
        )
    )
    return path
