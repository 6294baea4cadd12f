"""``safl serve`` as a process, on configuration written by ordinary tools: an API key file
that ends in a newline, a lexicon with a byte order mark; and what it leaves behind (no
ONNX Runtime telemetry under ``HOME``). Also the container healthchecks and the Compose ports."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import render_word
from service_support import REPO, encode, free_port, multipart, subprocess_env

WORDS = ["hello", "world"]


def _healthchecks(port: int) -> dict[str, str]:
    """The Python snippets of the image's HEALTHCHECK and of Compose's, aimed at ``port``."""
    dockerfile = (REPO / "Dockerfile").read_text()
    image = re.search(r'^HEALTHCHECK .*?CMD \["python", "-c", "(.*?)"\]$', dockerfile, re.S | re.M)
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["safl"]["healthcheck"]["test"]
    assert image and compose[:3] == ["CMD", "python", "-c"]
    return {"Dockerfile": image.group(1).replace("8000", str(port)), "docker-compose.yml": compose[3].replace("8000", str(port))}


def _wait_ready(url: str, proc: subprocess.Popen, headers: dict[str, str]) -> None:
    end = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.communicate()[0][-3000:]}")
        try:
            if httpx.get(url + "/readyz", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, "server never became ready"
        time.sleep(0.1)


def test_serve_takes_a_key_file_and_a_bom_lexicon_and_phones_nobody(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # Three faults of one kind, in one server process (each start costs seconds):
    # - SAFL_API_KEY from `echo KEY > file`: every request was 401 and the container
    #   healthchecks crashed on the newline (ValueError: Invalid header value);
    # - a lexicon saved with a UTF-8 byte order mark: the server refused to start;
    # - ONNX Runtime's telemetry wrote a device id under ~/.cache/Microsoft.
    home = tmp_path / "home"
    home.mkdir()
    lexicon = tmp_path / "words.txt"
    lexicon.write_bytes("\n".join(WORDS).encode("utf-8-sig"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in subprocess_env().items() if k != "ORT_DISABLE_TELEMETRY"}
    env |= {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "SAFL_API_KEY": "s3cret\n"}
    cmd = [sys.executable, "-m", "service", "serve", "--weights", str(tiny_checkpoint), "--port", str(port), "--threads", "1", "--no-warmup"]
    cmd += ["--backend", "onnx", "--lexicon", str(lexicon), "--auth-health", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        key = {"X-API-Key": "s3cret"}
        _wait_ready(url, proc, key)
        reply = httpx.post(url + "/recognize", files=multipart([encode(render_word("hello"))]), headers=key, timeout=30)
        backend = httpx.get(url + "/info", headers=key).json()["backend"]
        checks = {
            name: subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=30)
            for name, snippet in _healthchecks(port).items()
        }
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert reply.status_code == 200, reply.text
    assert reply.json()["results"][0]["text"] in WORDS  # the default lexicon is in use
    for name, check in checks.items():
        assert check.returncode == 0 and check.stdout.startswith("200"), f"{name}'s healthcheck: {check.stdout}{check.stderr}"
    assert backend == "onnx"
    telemetry = [p for p in home.rglob("*") if "Microsoft" in p.parts or ".onnxruntime" in p.parts]
    assert telemetry == [], f"ONNX Runtime's telemetry wrote under HOME: {telemetry}"
    assert "Traceback" not in output, output


def test_safl_recognize_phones_nobody(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # The CLI reads with ONNX Runtime too (its own process, its own import of the library).
    home = tmp_path / "home"
    home.mkdir()
    image = tmp_path / "word.png"
    image.write_bytes(encode(render_word("hello")))
    env = {k: v for k, v in subprocess_env().items() if k != "ORT_DISABLE_TELEMETRY"} | {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    cmd = [sys.executable, "-m", "service", "recognize", str(image), "--weights", str(tiny_checkpoint), "--backend", "onnx", "--threads", "1"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    telemetry = [p for p in home.rglob("*") if "Microsoft" in p.parts or ".onnxruntime" in p.parts]
    assert telemetry == [], f"ONNX Runtime's telemetry wrote under HOME: {telemetry}"


@pytest.mark.parametrize("key", ["kéy", "k\x01y", "k\ny"], ids=["non-ascii", "control", "inner-newline"])
def test_serve_refuses_a_key_no_client_can_send_in_one_line(tiny_checkpoint: Path, key: str) -> None:
    env = subprocess_env() | {"SAFL_API_KEY": key}
    cmd = [sys.executable, "-m", "service", "serve", "--weights", str(tiny_checkpoint), "--port", str(free_port())]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("safl serve: invalid --api-key (SAFL_API_KEY): the API key holds"), out.stderr
    assert key not in out.stderr  # the secret itself is never printed


def test_compose_publishes_its_ports_on_loopback_unless_told() -> None:
    # `docker compose up` published the service, with no API key, on every interface.
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published
    for port in published:
        host = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(port)).rsplit(":", 2)[0]  # the ${VAR:-default} Compose falls back on
        assert host == "127.0.0.1", port
