"""The development habits hold: the git hooks run the ruff that `make lint` runs, a fresh
`make setup` installs the linters, the changelog keeps an Unreleased section."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        found, _, version = line.partition("==")
        if found.lower().replace("_", "-") == name:
            return version
    raise AssertionError(f"{name} is not in constraints.txt")


def test_the_git_hooks_run_ruff_at_the_version_make_lint_runs():
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    pins = re.findall(r'"ruff==([^"]+)"', config)
    assert len(pins) == 2  # ruff check and ruff format
    assert set(pins) == {_constraint("ruff")}
    assert "entry: ruff check" in config and "entry: ruff format" in config


def _extra(name: str) -> set[str]:
    """The package names an extra of pyproject.toml lists (tomllib is 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(rf"^{name} = \[\n(.*?)^\]", text, re.M | re.S)
    assert block, f"no {name} extra"
    return {re.split(r"[<>=~\[]", found)[0] for found in re.findall(r'^\s+"([^"]+)"', block[1], re.M)}


def test_make_setup_installs_the_lint_extra_with_ruff_mypy_and_pre_commit():
    lint = _extra("lint")
    assert {"ruff", "mypy", "pre-commit", "types-requests", "types-jmespath"} <= lint
    test = _extra("test")
    assert "pytest" in test
    assert not test & {"ruff", "mypy", "pre-commit"}  # one place for each
    makefile = (ROOT / "Makefile").read_text()
    assert '-e ".[test,lint]"' in makefile
    for name in lint:
        _constraint(name)  # each linter at the version tested


def test_the_changelog_keeps_an_unreleased_section():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "[Keep a Changelog](https://keepachangelog.com/" in text
    assert re.search(r"^## \[Unreleased\]$", text, re.M)
    assert re.search(r"^### Added$", text, re.M)
