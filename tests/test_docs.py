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
                env[name[len("SAFL_"):].lower()] = match.group(1) if match else str(value)
    env.pop("device", None)  # cuda in the GPU file: checked at load time, not by Settings
    assert env, f"no SAFL_* settings found in {compose_file}"
    Settings(**env)
