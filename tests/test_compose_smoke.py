"""``bench/compose_smoke.sh`` leaves no downloaded torch wheel behind (no Docker engine needed).

The script runs from a copy in a temporary folder, with stand-ins for ``docker`` (answers
everything) and ``pip`` (``pip download`` writes a fake wheel); without ``weights/`` it stops
right after the download, so only its exit trap is exercised.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_DOCKER = "#!/bin/sh\necho 20.10.0\n"
# pip download --no-deps -q -d DIR SPEC: writes a torch wheel into DIR
FAKE_PIP = '#!/bin/sh\nmkdir -p "$5" && echo fake > "$5/torch-2.13.0+cpu-cp311-none-any.whl"\n'


def _run_smoke(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "bench").mkdir(exist_ok=True)
    shutil.copy(ROOT / "bench" / "compose_smoke.sh", tmp_path / "bench" / "compose_smoke.sh")
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("docker", FAKE_DOCKER), ("pip", FAKE_PIP)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMOKE_", "DOCKER_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(tmp_path / "bench" / "compose_smoke.sh")], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_smoke_removes_the_wheels_folder_it_created(tmp_path: Path) -> None:
    proc = _run_smoke(tmp_path)
    assert "downloaded torch-2.13.0+cpu-cp311-none-any.whl into wheels/" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode != 0 and "weights/safl.safetensors or its .json sidecar is missing" in proc.stdout
    assert not (tmp_path / "wheels").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_smoke_keeps_a_wheels_folder_it_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "other.whl").write_text("mine")
    proc = _run_smoke(tmp_path)
    assert "downloaded torch-2.13.0+cpu-cp311-none-any.whl" in proc.stdout, proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "wheels").iterdir()) == ["other.whl"]

    # A torch wheel that was already there is the user's: left alone.
    (tmp_path / "wheels" / "torch-2.13.0+cpu-cp311-none-any.whl").write_text("mine")
    proc = _run_smoke(tmp_path)
    assert "wheels/ has torch-2.13.0+cpu-cp311-none-any.whl" in proc.stdout, proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "wheels").iterdir()) == ["other.whl", "torch-2.13.0+cpu-cp311-none-any.whl"]
