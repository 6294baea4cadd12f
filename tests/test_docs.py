"""The README documents what the code does: every setting, the two first commands, CI's command."""

from __future__ import annotations

from pathlib import Path

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
    assert install_and_test in (ROOT / ".ci" / "run").read_text()
