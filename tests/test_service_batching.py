"""Dynamic batching, overload, deadlines, failures, supervision, warm-up and drain.

The model is the real tiny SAFL; ``GatedModel`` holds or fails batches to make timing
deterministic.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import render_word
from PIL import Image
from service_support import assert_matches, encode, expected, gated_predictor, metric, multipart, running_app, runtime_of, settings_for, wait_until

from model import SAFL

pytestmark = pytest.mark.anyio

WORDS = ["alpha", "Bravo", "charlie", "DELTA", "echo7", "fox", "golf!", "Hotel", "india", "jul"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def images(tiny_model: SAFL) -> list[bytes]:
    """Word images the tiny model tells apart (distinct confidences), so a mix-up would show."""
    files = [encode(render_word(w, (100 + 7 * i, 32))) for i, w in enumerate(WORDS)]
    # Told apart by their per-character confidences (what assert_matches compares): the whole-
    # word confidences of an untrained model that never ends a word are all ~1e-39.
    readings = [r.char_confidences for r in expected(tiny_model, files)]
    for a, b in itertools.combinations(readings, 2):
        assert max(abs(x - y) / max(x, y) for x, y in zip(a, b)) > 1e-3, "test images must give distinct readings"  # 10x _approx
    return files


async def _busy_worker(client: httpx.AsyncClient, gated: Any, png: bytes) -> asyncio.Task[httpx.Response]:
    """Close the gate and start a request that occupies the worker until the gate opens."""
    gated.close_gate(forget_calls=False)
    task = asyncio.create_task(client.post("/recognize", files=multipart([png])))
    await wait_until(gated.entered.is_set)
    return task


async def test_concurrent_requests_are_batched_and_get_their_own_results(tiny_checkpoint: Path, tiny_model: SAFL, images: list[bytes]) -> None:
    want = expected(tiny_model, images)
    # Request i sends images i, i+1, ... (1 to 3 of them): overlapping sets, different orders.
    plan = [[(i + k) % len(images) for k in range(1 + i % 3)] for i in range(24)]
    settings = settings_for(tiny_checkpoint, max_batch_size=8, max_wait_ms=25.0)
    async with running_app(settings) as (app, client):
        replies = await asyncio.gather(*(client.post("/recognize", files=multipart([images[j] for j in idx])) for idx in plan))
        text = (await client.get("/metrics")).text
    for idx, r in zip(plan, replies, strict=True):
        assert r.status_code == 200, r.text
        assert_matches(r.json()["results"], [want[j] for j in idx])
    batches = metric(text, "safl_batch_size_count")
    crops = metric(text, "safl_batch_size_sum")
    assert crops == sum(len(p) for p in plan) == metric(text, "safl_crops_recognized_total")
    # Observed batching: fewer batches than crops, and some batch held more than one crop.
    assert batches < crops
    assert metric(text, "safl_batch_size_bucket", le="1.0") < batches
    assert metric(text, "safl_batch_size_bucket", le="8.0") == batches  # never above max_batch_size


async def test_batching_off_runs_one_crop_per_batch(tiny_checkpoint: Path, images: list[bytes]) -> None:
    async with running_app(settings_for(tiny_checkpoint, max_batch_size=1)) as (app, client):
        replies = await asyncio.gather(*(client.post("/recognize", files=multipart(images[:2])) for _ in range(4)))
        text = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in replies)
    assert metric(text, "safl_batch_size_count") == metric(text, "safl_batch_size_sum") == 8


async def test_queue_full_is_503_with_retry_after(tiny_checkpoint: Path, images: list[bytes]) -> None:
    predictor, gated = gated_predictor(tiny_checkpoint)
    settings = settings_for(tiny_checkpoint, max_batch_size=1, max_queue=2, max_files=2, retry_after_s=3)
    async with running_app(settings, predictor) as (app, client):
        running = await _busy_worker(client, gated, images[0])
        queued = asyncio.create_task(client.post("/recognize", files=multipart(images[1:3])))
        await wait_until(lambda: runtime_of(app).batcher.depth == 2)  # type: ignore[union-attr]
        refused = await client.post("/recognize", files=multipart(images[3:4]))
        gated.gate.set()
        done = [await running, await queued]
        text = (await client.get("/metrics")).text
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
    assert refused.json()["error"]["code"] == "overloaded"
    assert [r.status_code for r in done] == [200, 200]
    assert metric(text, "safl_errors_total", reason="overloaded") == 1


async def test_requests_beyond_max_connections_get_a_json_503_but_probes_pass(tiny_checkpoint: Path, images: list[bytes]) -> None:
    predictor, gated = gated_predictor(tiny_checkpoint)
    settings = settings_for(tiny_checkpoint, max_batch_size=1, max_connections=2, retry_after_s=4)
    async with running_app(settings, predictor) as (app, client):
        running = await _busy_worker(client, gated, images[0])
        queued = asyncio.create_task(client.post("/recognize", files=multipart(images[1:2])))
        await wait_until(lambda: runtime_of(app).batcher.depth == 1)  # type: ignore[union-attr]
        refused = await client.post("/recognize", files=multipart(images[2:3]))
        info = await client.get("/info")  # any other route counts too
        probes = [await client.get(p) for p in ("/healthz", "/readyz", "/metrics")]
        gated.gate.set()
        done = [await running, await queued]
        after = await client.post("/recognize", files=multipart(images[3:4]))
        text = (await client.get("/metrics")).text
    for r in (refused, info):
        assert r.status_code == 503 and r.headers["retry-after"] == "4"
        assert r.json()["error"]["code"] == "overloaded" and "2 requests are in progress" in r.json()["error"]["message"]
    assert [p.status_code for p in probes] == [200, 200, 200]
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200
    assert metric(text, "safl_errors_total", reason="overloaded") == 2
    assert metric(text, "safl_request_duration_seconds_count", route="/recognize", status="503") == 1


async def test_a_requests_second_pass_keeps_its_place_in_the_queue(tiny_checkpoint: Path, images: list[bytes]) -> None:
    # An unsure tall crop's turned views are read in a second submission. Queued at the tail,
    # they waited behind every request that arrived meanwhile: one such crop pinned its
    # request's answer to the end of the whole backlog (6 lexicon requests all 504 at 10 s).
    predictor, gated = gated_predictor(tiny_checkpoint)
    tall = encode(render_word("tall", (100, 32)).transpose(Image.Transpose.ROTATE_90))
    # One crop a batch, every view read: the order of the model's work is the queue's order.
    settings = settings_for(tiny_checkpoint, max_batch_size=1, max_wait_ms=0.0, turn_tall=True, views_confident_at=1.0)
    async with running_app(settings, predictor) as (app, client):
        batcher = runtime_of(app).batcher
        assert batcher is not None
        gated.close_gate()
        finished: list[str] = []
        first = asyncio.create_task(client.post("/recognize", files=multipart([tall])))
        first.add_done_callback(lambda _: finished.append("tall"))
        await wait_until(gated.entered.is_set)  # its first pass is in the model
        later = asyncio.create_task(client.post("/recognize", files=multipart(images[:8])))
        later.add_done_callback(lambda _: finished.append("later"))
        await wait_until(lambda: batcher.depth == 8)
        gated.gate.set()
        replies = [await first, await later]
    assert [r.status_code for r in replies] == [200, 200]
    assert gated.calls == [1] * 11  # the tall crop, 2 turned views of it, 8 wide crops
    # At most the one crop the freed worker took before the second pass was submitted went
    # ahead of it; then the earlier request's views, then the rest.
    assert finished == ["tall", "later"]


async def test_deadline_is_504_and_expired_crops_never_reach_the_model(tiny_checkpoint: Path, images: list[bytes]) -> None:
    predictor, gated = gated_predictor(tiny_checkpoint)
    async with running_app(settings_for(tiny_checkpoint), predictor) as (app, client):
        gated.calls.clear()
        running = await _busy_worker(client, gated, images[0])
        late = await client.post("/recognize", files=multipart(images[1:4]), headers={"X-Request-Timeout-Ms": "80"})
        gated.gate.set()
        assert (await running).status_code == 200
        after = await client.post("/recognize", files=multipart(images[4:5]))
        text = (await client.get("/metrics")).text
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert after.status_code == 200
    assert gated.calls == [1, 1]  # the busy request and the one after: the 3 expired crops were dropped
    assert metric(text, "safl_crops_dropped_total", reason="expired") == 3
    assert metric(text, "safl_errors_total", reason="deadline_exceeded") == 1


async def test_server_default_deadline_applies(tiny_checkpoint: Path, images: list[bytes]) -> None:
    predictor, gated = gated_predictor(tiny_checkpoint)
    async with running_app(settings_for(tiny_checkpoint, timeout_ms=100), predictor) as (app, client):
        gated.gate.clear()
        # A client can only shorten the deadline: asking for longer still gets the server's 100 ms.
        r = await client.post("/recognize", files=multipart(images[:1]), headers={"X-Request-Timeout-Ms": "60000"})
        gated.gate.set()
    assert r.status_code == 504


async def test_failing_batch_fails_only_its_requests(tiny_checkpoint: Path, tiny_model: SAFL, images: list[bytes]) -> None:
    predictor, gated = gated_predictor(tiny_checkpoint)
    async with running_app(settings_for(tiny_checkpoint, max_batch_size=2), predictor) as (app, client):
        failing = await _busy_worker(client, gated, images[0])
        # Queued behind the failing batch: it must be served normally by the same worker.
        queued = asyncio.create_task(client.post("/recognize", files=multipart(images[2:4])))
        await wait_until(lambda: runtime_of(app).batcher.depth == 2)  # type: ignore[union-attr]
        gated.fail_next = RuntimeError("injected failure")
        gated.gate.set()
        failed, ok = await failing, await queued
        ready = await client.get("/readyz")
        text = (await client.get("/metrics")).text
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "inference_failed"
    assert "injected" not in failed.text and "Traceback" not in failed.text
    assert ok.status_code == 200 and ready.status_code == 200
    assert_matches(ok.json()["results"], expected(tiny_model, images[2:4]))
    assert metric(text, "safl_errors_total", reason="inference_failed") == 1
    assert metric(text, "safl_worker_restarts_total") == 0


async def test_out_of_memory_splits_the_batch(tiny_checkpoint: Path, tiny_model: SAFL, images: list[bytes]) -> None:
    predictor, gated = gated_predictor(tiny_checkpoint)
    async with running_app(settings_for(tiny_checkpoint), predictor) as (app, client):
        gated.calls.clear()
        gated.oom_above = 2
        r = await client.post("/recognize", files=multipart(images[:5]))
        gated.oom_above = 0
        single = await client.post("/recognize", files=multipart(images[:1]))
        gated.oom_above = None
    assert r.status_code == 200, r.text
    assert_matches(r.json()["results"], expected(tiny_model, images[:5]))
    assert gated.calls[:5] == [5, 2, 3, 1, 2]  # 5 → 2 + 3 → 2 + (1 + 2)
    assert single.status_code == 503 and single.json()["error"]["code"] == "out_of_memory" and "retry-after" in single.headers


async def test_worker_crash_turns_readiness_503_and_restarts(tiny_checkpoint: Path, images: list[bytes]) -> None:
    async with running_app(settings_for(tiny_checkpoint)) as (app, client):
        batcher = runtime_of(app).batcher
        assert batcher is not None
        original = batcher._form_batch
        broken = {"on": True}

        async def crashing_form_batch() -> Any:
            if broken["on"]:
                raise RuntimeError("injected: worker loop bug")
            return await original()

        batcher._form_batch = crashing_form_batch  # type: ignore[method-assign]
        # The worker sits inside the old _form_batch; one request lets it loop into the broken one.
        assert (await client.post("/recognize", files=multipart(images[:1]))).status_code == 200

        async def not_ready() -> bool:
            return (await client.get("/readyz")).status_code == 503

        await wait_until(not_ready, timeout=5)
        assert (await client.get("/healthz")).status_code == 200  # supervised: not dead, restarting
        queued = asyncio.create_task(client.post("/recognize", files=multipart(images[1:3])))
        await asyncio.sleep(0.05)
        broken["on"] = False
        await wait_ready_again(client)
        r = await queued
        text = (await client.get("/metrics")).text
    assert r.status_code == 200  # queued across the restart, then served
    assert metric(text, "safl_worker_restarts_total") >= 1


async def wait_ready_again(client: httpx.AsyncClient) -> None:
    async def ready() -> bool:
        return (await client.get("/readyz")).status_code == 200

    await wait_until(ready, timeout=10)


async def test_crash_mid_batch_fails_that_batch_with_503(tiny_checkpoint: Path, images: list[bytes]) -> None:
    async with running_app(settings_for(tiny_checkpoint)) as (app, client):
        batcher = runtime_of(app).batcher
        assert batcher is not None
        original = batcher._execute

        async def crashing_execute(batch: Any, loop: Any) -> None:
            batcher._execute = original  # type: ignore[method-assign]  # crash once
            raise RuntimeError("injected: crash while holding a batch")

        batcher._execute = crashing_execute  # type: ignore[method-assign]
        r = await client.post("/recognize", files=multipart(images[:2]))
        await wait_ready_again(client)
        ok = await client.post("/recognize", files=multipart(images[:2]))
    assert r.status_code == 503 and r.json()["error"]["code"] == "worker_crashed"
    assert ok.status_code == 200


async def test_readiness_during_warmup(tiny_checkpoint: Path, tiny_model: SAFL, images: list[bytes]) -> None:
    predictor, gated = gated_predictor(tiny_checkpoint)
    gated.gate.clear()  # warm-up blocks on its first batch
    async with running_app(settings_for(tiny_checkpoint, max_batch_size=4), predictor, ready=False) as (app, client):
        await wait_until(gated.entered.is_set)
        not_ready = await client.get("/readyz")
        alive = await client.get("/healthz")
        early = asyncio.create_task(client.post("/recognize", files=multipart(images[:1])))
        await asyncio.sleep(0.05)
        assert not early.done()  # queued until warm-up is over
        gated.gate.set()
        await wait_ready_again(client)
        r = await early
    assert not_ready.status_code == 503 and not_ready.json()["error"] == {"code": "not_ready", "message": "warming up"}
    assert alive.status_code == 200
    assert gated.calls[:3] == [1, 2, 4]  # warm-up ran the batch sizes before serving
    assert r.status_code == 200
    assert_matches(r.json()["results"], expected(tiny_model, images[:1]))


async def test_drain_refuses_new_work_and_finishes_admitted(tiny_checkpoint: Path, images: list[bytes]) -> None:
    predictor, gated = gated_predictor(tiny_checkpoint)
    async with running_app(settings_for(tiny_checkpoint, max_batch_size=1), predictor) as (app, client):
        runtime = runtime_of(app)
        running = await _busy_worker(client, gated, images[0])
        queued = asyncio.create_task(client.post("/recognize", files=multipart(images[1:2])))
        await wait_until(lambda: runtime.batcher.depth == 1)  # type: ignore[union-attr]
        drained = asyncio.create_task(runtime.drain(timeout=10))
        await asyncio.sleep(0.02)
        ready = await client.get("/readyz")
        refused = await client.post("/recognize", files=multipart(images[2:3]))
        assert not drained.done()
        gated.gate.set()
        finished = [await running, await queued]
        assert await drained is True
    assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down" and "retry-after" in refused.headers
    assert [r.status_code for r in finished] == [200, 200]


async def test_out_of_memory_error_type_exists_on_cpu_builds() -> None:
    # The OOM path catches torch.OutOfMemoryError; it must exist even without CUDA.
    assert issubclass(torch.OutOfMemoryError, RuntimeError)


# --- the batcher alone (its run function is a plain function of the crops: the rules, not the model)


def _sums(crops: list[torch.Tensor]) -> list[float]:
    return [float(c.sum()) for c in crops]


async def test_batcher_waits_for_the_window_then_dispatches_a_partial_batch() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from service.batcher import BatcherConfig, DynamicBatcher

    sizes: list[int] = []

    def run(crops: list[torch.Tensor]) -> list[float]:
        sizes.append(len(crops))
        return _sums(crops)

    with ThreadPoolExecutor(1) as pool:
        b = DynamicBatcher(run, BatcherConfig(max_batch_size=8, max_wait_s=0.15), pool)
        b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        futs = b.submit([torch.full((1,), 1.0), torch.full((1,), 2.0)], deadline=float("inf"))
        await asyncio.sleep(0.02)
        futs += b.submit([torch.full((1,), 3.0)], deadline=float("inf"))
        assert await asyncio.gather(*futs) == [1.0, 2.0, 3.0]
        assert loop.time() - t0 >= 0.14  # held back for the window of the oldest crop...
        assert sizes == [3]  # ...which let the later crop join the batch
        await b.stop()


async def test_batcher_full_batch_goes_at_once_and_late_arrivals_do_not_wait() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from service.batcher import BatcherConfig, DynamicBatcher

    sizes: list[int] = []
    release = threading.Event()

    def run(crops: list[torch.Tensor]) -> list[float]:
        sizes.append(len(crops))
        release.wait(10)
        return _sums(crops)

    with ThreadPoolExecutor(1) as pool:
        # A 30 s window: only the two other rules can dispatch anything in this test.
        b = DynamicBatcher(run, BatcherConfig(max_batch_size=4, max_wait_s=30.0), pool)
        b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = b.submit([torch.full((1,), float(i)) for i in range(4)], deadline=float("inf"))
        await wait_until(lambda: b.busy)  # a full batch: dispatched without waiting
        late = b.submit([torch.full((1,), 9.0)], deadline=float("inf"))  # arrives while the worker is busy
        release.set()
        assert await asyncio.gather(*first) == [0.0, 1.0, 2.0, 3.0]
        assert await asyncio.gather(*late) == [9.0]  # taken as soon as the worker freed up
        assert loop.time() - t0 < 10
        assert sizes == [4, 1]
        await b.stop()
