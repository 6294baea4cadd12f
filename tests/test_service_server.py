"""Real sockets: client disconnects, and SIGTERM handling of ``python -m service serve``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import render_word
from service_support import (
    encode,
    free_port,
    gated_predictor,
    metric,
    multipart,
    serve_in_thread,
    settings_for,
    slow_server_script,
    subprocess_env,
    wait_process_ready,
)

from service import create_app

REPO = Path(__file__).resolve().parent.parent
PNGS = [encode(render_word(w)) for w in ("one", "two", "three", "four")]


def _wait_metric(url: str, name: str, value: float, timeout: float = 10.0, **labels: str) -> None:
    end = time.monotonic() + timeout
    while metric(httpx.get(url + "/metrics").text, name, **labels) != value:
        if time.monotonic() > end:
            raise AssertionError(f"{name}{labels} never reached {value}")
        time.sleep(0.02)


def _serve_command(checkpoint: Path, port: int, *flags: str) -> list[str]:
    """``safl serve`` of ``checkpoint`` on ``port`` with one thread, as a subprocess command."""
    return [sys.executable, "-m", "service", "serve", "--weights", str(checkpoint), "--port", str(port), "--threads", "1", *flags]


def test_client_disconnect_drops_its_pending_crops(tiny_checkpoint: Path) -> None:
    predictor, gated = gated_predictor(tiny_checkpoint)
    app = create_app(settings_for(tiny_checkpoint, max_batch_size=1), predictor=predictor)
    with serve_in_thread(app) as url:
        gated.close_gate()
        replies: list[httpx.Response] = []
        busy = threading.Thread(target=lambda: replies.append(httpx.post(url + "/recognize", files=multipart(PNGS[:1]), timeout=30)))
        busy.start()
        assert gated.entered.wait(10)
        # This client gives up (read timeout) and closes its connection while its 2 crops are queued.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/recognize", files=multipart(PNGS[1:3]), timeout=httpx.Timeout(10, read=0.3))
        _wait_metric(url, "safl_errors_total", 1, reason="client_disconnected")
        gated.gate.set()
        busy.join(10)
        after = httpx.post(url + "/recognize", files=multipart(PNGS[3:4]), timeout=30)
        text = httpx.get(url + "/metrics").text
    assert [r.status_code for r in replies] == [200] and after.status_code == 200
    assert gated.calls == [1, 1]  # the disconnected client's crops never reached the model
    assert metric(text, "safl_crops_dropped_total", reason="cancelled") == 2
    assert metric(text, "safl_request_duration_seconds_count", route="/recognize", status="499") == 1


def test_head_probes_answer_like_get_without_a_body(tiny_checkpoint: Path) -> None:
    # HEAD-probing monitors and `wget --spider` got 405 and marked a healthy instance down.
    app = create_app(settings_for(tiny_checkpoint, max_batch_size=1))
    with serve_in_thread(app) as url:
        for path in ("/healthz", "/readyz", "/metrics"):
            get, head = httpx.get(url + path), httpx.head(url + path)
            assert head.status_code == get.status_code == 200, path
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
        assert httpx.head(url + "/recognize").status_code == 405


@pytest.mark.slow
def test_python_m_service_serve_exits_0_on_sigterm(tiny_checkpoint: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = _serve_command(tiny_checkpoint, port, "--max-batch-size", "4", "--log-level", "warning")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_process_ready(url, proc, 60.0, lambda: proc.stderr.read() if proc.stderr and proc.poll() is not None else "")
        r = httpx.post(url + "/recognize", files=multipart(PNGS[:2]), timeout=30)
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigterm_drains_admitted_work_and_refuses_new(tiny_checkpoint: Path, tmp_path: Path) -> None:
    script = slow_server_script(tmp_path / "slow_server.py", log_level="warning")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tiny_checkpoint), str(port)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_process_ready(url, proc, 60.0, lambda: proc.stderr.read() if proc.stderr and proc.poll() is not None else "")
        replies: list[httpx.Response] = []
        admitted = threading.Thread(target=lambda: replies.append(httpx.post(url + "/recognize", files=multipart(PNGS[:1]), timeout=30)))
        admitted.start()
        _wait_metric(url, "safl_in_flight_crops", 1)  # its batch is running
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 5
        while httpx.get(url + "/readyz", timeout=5).status_code != 503:
            assert time.monotonic() < end, "readiness never turned 503"
            time.sleep(0.02)
        refused = httpx.post(url + "/recognize", files=multipart(PNGS[1:2]), timeout=10)
        admitted.join(20)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert [r.status_code for r in replies] == [200]  # the admitted request was finished
    assert code == 0


@pytest.mark.parametrize("log_probes", [False, True], ids=["default", "access-log-probes"])
def test_access_log_leaves_out_successful_probes_and_scrapes(tiny_checkpoint: Path, log_probes: bool) -> None:
    # Docker's healthcheck and Prometheus (every 5 s) wrote one access line each; /recognize
    # lines and failed probes (here a scrape without the API key) must still be logged.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = _serve_command(tiny_checkpoint, port, "--no-warmup", "--log-level", "info", "--auth-metrics")
    if log_probes:
        cmd.append("--access-log-probes")
    env = subprocess_env() | {"SAFL_API_KEY": "k"}
    key = {"X-API-Key": "k"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_process_ready(url, proc, 60.0, lambda: proc.stdout.read() if proc.stdout and proc.poll() is not None else "")
        for path in ("/healthz", "/readyz", "/metrics?x=1"):
            assert httpx.get(url + path, headers=key).status_code == 200, path
        assert httpx.head(url + "/healthz").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.post(url + "/recognize", files=multipart(PNGS[:1]), headers=key, timeout=30).status_code == 200
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # uvicorn's access line: 127.0.0.1:PORT - "GET /healthz HTTP/1.1" 200 OK
    access = {m.groups() for m in re.finditer(r'"(\w+) (\S+) HTTP/1\.1" (\d+)', output)}
    assert ("POST", "/recognize", "200") in access, output
    assert ("GET", "/metrics", "401") in access, output
    probes_ok = {a for a in access if a[1].split("?")[0] in ("/healthz", "/readyz", "/metrics") and a[2] == "200"}
    if log_probes:
        assert {("GET", "/healthz", "200"), ("HEAD", "/healthz", "200"), ("GET", "/readyz", "200"), ("GET", "/metrics?x=1", "200")} <= probes_ok, output
    else:
        assert probes_ok == set(), output
