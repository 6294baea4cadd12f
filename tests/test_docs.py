"""The README documents what the code does: every setting, the two first commands, CI's command,
every `safl` flag and `SAFL_*` variable it shows, and every file it (or the model card, the training
log, the results index) links to."""

from __future__ import annotations

import argparse
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
    paths = ["model", "service", "bench", "scripts", "tests", "examples"]
    out = subprocess.run([str(ruff), *command, *paths], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"run `ruff {' '.join(command)}`:\n" + out.stdout + out.stderr


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from service.cli import build_parser

    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


def _commands(text: str) -> list[str]:
    """Every shell command line of the text's code blocks (continuation lines joined) and every
    inline code span."""
    blocks = re.split(r"^```.*$", text, flags=re.M)[1::2]  # the text between a fence and the next
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return lines + spans


def test_every_safl_flag_the_readme_shows_exists() -> None:
    # `safl SUB ... --flag` in a code block or an inline span: the flag must be SUB's. A command
    # ends at a comment, a pipe, a redirection or the next command.
    subs = _subparsers()
    shown = 0
    for command in _commands(README):
        for match in re.finditer(r"\bsafl ([a-z]+)\b", command):
            sub = match.group(1)
            if sub not in subs:
                continue  # prose such as "safl reads"
            rest = re.split(r"\s(?:#|\||&&|;|<|>)", command[match.end() :])[0]
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                shown += 1
                assert flag in _flags(subs[sub]), f"README shows `safl {sub} {flag}`, which `safl {sub} --help` does not have: {command!r}"
    assert shown > 20, "found too few `safl` commands in the README: has the parsing broken?"


# A section's bare `--flag` spans name flags of these subcommands.
SECTION_COMMANDS = {"### Without a server": ["recognize"], "## Configuration": ["serve"], "## Train or fine-tune": ["train", "synth", "eval"]}


@pytest.mark.parametrize("heading", SECTION_COMMANDS)
def test_the_flags_a_section_names_exist(heading: str) -> None:
    subs = _subparsers()
    section = README[README.index("\n" + heading) + 1 :]
    end = re.search(r"\n#{2,3} ", section)
    section = section[: end.start()] if end else section
    known = set().union(*(_flags(subs[name]) for name in SECTION_COMMANDS[heading]))
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", section, flags=re.S))
    named = {flag for span in spans if span.startswith("--") for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span)}
    assert named, f"no flags found under {heading}"
    missing = sorted(named - known)
    assert not missing, f"README's {heading!r} names flags {' '.join(SECTION_COMMANDS[heading])} does not have: {missing}"


def test_every_environment_variable_the_readme_names_is_a_setting() -> None:
    named = set(re.findall(r"\bSAFL_[A-Z0-9_]*[A-Z0-9]", README))
    from model.training.fonts import FONT_DIRS_ENV
    from model.training.synth import BACKGROUND_DIRS_ENV

    settings = {f"SAFL_{name.upper()}" for name in Settings.model_fields} | {FONT_DIRS_ENV, BACKGROUND_DIRS_ENV}  # the renderer's two
    assert named, "no SAFL_* variables found in the README"
    assert not named - settings, f"README names SAFL_* variables that neither service.settings.Settings nor the renderer reads: {sorted(named - settings)}"


LINKING_DOCS = ["README.md", "CHANGELOG.md", "weights/MODEL_CARD.md", "weights/TRAINING_LOG.md", "docs/results/INDEX.md"]


@pytest.mark.parametrize("doc", LINKING_DOCS)
def test_every_relative_link_resolves(doc: str) -> None:
    # Moving or removing a result file must not leave a dead link behind.
    path = ROOT / doc
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    dead = sorted({link for link in local if link and not (path.parent / link).exists()})
    assert not dead, f"{doc} links to files that do not exist: {dead}"


def test_every_result_file_is_indexed() -> None:
    # docs/results/ holds the files behind the figures in the docs, each listed in INDEX.md.
    results = ROOT / "docs" / "results"
    index = (results / "INDEX.md").read_text()
    unlisted = sorted(f.name for f in results.iterdir() if f.is_file() and f.name != "INDEX.md" and f"({f.name})" not in index)
    assert not unlisted, f"docs/results/INDEX.md does not list: {unlisted}"
