"""The README documents what the code does: every setting, the two first commands, CI's command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    for name in Settings.model_fields:
        env = f"SAFL_{name.upper()}"
        flag = "--" + name.replace("_", "-")
        assert f"`{env}`" in README, f"{env} is missing from the README's configuration table"
        assert flag in README, f"{flag} is missing from the README's configuration table"


def test_ci_runs_the_readme_test_command() -> None:
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    install_and_serve, install_and_test = [line.split("#")[0].strip() for line in first_block.strip().splitlines()[:2]]
    assert install_and_serve.endswith("safl serve")
    run_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    # Run, not only echoed: a line that starts with the command itself.
    assert any(line.startswith(install_and_test) for line in run_lines), f".ci/run does not run {install_and_test!r}"


@pytest.mark.parametrize("compose_file", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_defaults_are_valid_settings(compose_file: str) -> None:
    # The SAFL_* defaults the compose files pass (`${VAR:-default}`) must start a server:
    # an inconsistent pair (e.g. a queue too short for max_files) would crash-loop the container.
    services = yaml.safe_load((ROOT / compose_file).read_text())["services"]
    env = {}
    for service in services.values():
        for name, value in (service.get("environment") or {}).items():
            if name.startswith("SAFL_") and value is not None:
                match = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
                env[name[len("SAFL_") :].lower()] = match.group(1) if match else str(value)
    env.pop("device", None)  # cuda in the GPU file: checked at load time, not by Settings
    assert env, f"no SAFL_* settings found in {compose_file}"
    Settings(**env)


def test_container_healthchecks_probe_readiness() -> None:
    # `docker compose up --wait` waits for "healthy": with /healthz (liveness) it returned
    # before the model was warmed up. Both the image's HEALTHCHECK and compose's probe /readyz.
    dockerfile = (ROOT / "Dockerfile").read_text()
    healthcheck = dockerfile.split("\nHEALTHCHECK ", 1)[1].split("\n\n", 1)[0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["safl"]["healthcheck"]["test"]
    for probe in (healthcheck, " ".join(compose)):
        assert "'/readyz'" in probe and "/healthz" not in probe, probe


def test_readme_lists_exactly_the_servers_error_codes() -> None:
    from service.errors import errors_table

    header = errors_table().splitlines()[0]
    assert header in README, "README has no error table: paste service.errors.errors_table()"
    block = README[README.index(header) :].split("\n\n", 1)[0]
    assert block == errors_table(), "README's error table differs from service.errors.ERRORS: paste errors_table()"


@pytest.mark.parametrize("command", [["check", "--output-format", "concise"], ["format", "--check"]], ids=["lint", "format"])
def test_the_code_passes_the_linter_and_the_formatter(command: list[str]) -> None:
    import subprocess
    import sys

    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.is_file():
        pytest.skip("ruff is not installed in this environment (pip install -e '.[dev]')")
    out = subprocess.run([str(ruff), *command, "model", "service", "bench", "scripts", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"run `ruff {' '.join(command)}`:\n" + out.stdout + out.stderr
