"""``safl serve`` as a process under hostile connections: sockets that never complete their
request headers, and a second SIGTERM while requests are in flight."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from conftest import render_word
from service_support import REPO, encode, free_port, metric, multipart, slow_server_script, subprocess_env, wait_process_ready

PNG = encode(render_word("word"))


@contextmanager
def _server(cmd: list[str], port: int) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_process_ready(url, proc, 90.0, lambda: proc.communicate()[0] if proc.poll() is not None else "")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (reads EOF or a reset)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_and_trickling_sockets_neither_take_the_probes_down_nor_stay_open(tiny_checkpoint: Path) -> None:
    # uvicorn's limit_concurrency (2 x --max-connections) counted these sockets and answered
    # every path, the probes included, with a plain-text 503 for as long as they were held;
    # Kubernetes' liveness probe then restarted the pod.
    port = free_port()
    cmd = [sys.executable, "-m", "service", "serve", "--weights", str(tiny_checkpoint), "--port", str(port), "--threads", "1", "--no-warmup"]
    cmd += ["--max-connections", "4", "--header-timeout-s", "1", "--log-level", "warning"]
    with _server(cmd, port) as (url, _):
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
        trickling = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
        for s in trickling:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        # Requests whose bodies never finish: they fill the app's own cap of 4.
        uploads = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for s in uploads:
            s.sendall(b"POST /recognize HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n")
        stop = threading.Event()

        def trickle() -> None:  # a header line a little at a time, never the blank line that ends them
            while not stop.wait(0.2):
                for s in trickling:
                    try:
                        s.sendall(b"X-A: b\r\n")
                    except OSError:
                        pass

        threading.Thread(target=trickle, daemon=True).start()
        try:
            time.sleep(0.3)  # the uploads are in the app by now
            probes = {path: httpx.get(url + path, timeout=5) for path in ("/healthz", "/readyz", "/metrics")}
            beyond = httpx.post(url + "/recognize", files=multipart([PNG]), timeout=10)
            started = time.monotonic()
            closed = [_closed_by_server(s, 5.0) for s in silent + trickling]
            waited = time.monotonic() - started
            uploads_open = [not _closed_by_server(s, 0.05) for s in uploads]
        finally:
            stop.set()
            for s in silent + trickling + uploads:
                s.close()
        # The held sockets gone, the server takes work again.
        after = httpx.post(url + "/recognize", files=multipart([PNG]), timeout=30)
    assert {path: r.status_code for path, r in probes.items()} == {"/healthz": 200, "/readyz": 200, "/metrics": 200}
    assert beyond.status_code == 503 and beyond.json()["error"]["code"] == "overloaded"  # the app's JSON cap, not uvicorn's text
    assert all(closed) and waited < 3.0, (closed, waited)
    assert all(uploads_open)  # a request whose headers arrived is the app's business (its deadline)
    assert after.status_code == 200


def test_a_second_sigterm_exits_at_once_and_answers_the_cut_off_requests(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # The second signal used to cancel the requests in flight (uvicorn's plain-text 500,
    # CancelledError tracebacks in the log) and then wait the whole drain timeout (31 s).
    script = slow_server_script(tmp_path / "slow_server.py", max_batch_size=1, log_level="info")
    port = free_port()
    with _server([sys.executable, str(script), str(tiny_checkpoint), str(port)], port) as (url, proc):
        replies: list[httpx.Response | Exception] = []

        def post() -> None:
            try:
                replies.append(httpx.post(url + "/recognize", files=multipart([PNG]), timeout=60))
            except httpx.TransportError as exc:  # a closed connection is an acceptable answer too
                replies.append(exc)

        clients = [threading.Thread(target=post) for _ in range(4)]
        for c in clients:
            c.start()
        end = time.monotonic() + 10
        while metric(httpx.get(url + "/metrics").text, "safl_in_flight_requests") < 4:  # one in the model, three queued
            assert time.monotonic() < end, "the requests never got in"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        second = time.monotonic()
        code = proc.wait(timeout=30)
        exited_after = time.monotonic() - second
        for c in clients:
            c.join(10)
        output = proc.communicate(timeout=10)[0]
    assert code == 0
    assert exited_after < 2.5, f"exited {exited_after:.1f} s after the second signal"
    statuses = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in replies]
    assert len(statuses) == 4 and 500 not in statuses, statuses
    cut_off = [r for r in replies if isinstance(r, httpx.Response) and r.status_code == 503]
    assert cut_off, statuses
    for r in cut_off:
        assert r.json()["error"]["code"] == "shutting_down", r.text
    assert "Traceback" not in output and "CancelledError" not in output, output
