"""The release artefacts: `python -m build` makes an sdist and a wheel (the wheel built from
the sdist, so the sdist is shown to rebuild), `twine check --strict` passes both, and the
wheel installed with pip into a clean virtualenv runs `--about` and a real load into the
sandbox. The sdist's file list holds the sources, README, LICENSE and Meltano plugin
definition, and none of a working checkout's caches, virtualenvs or run outputs.

Building fetches hatchling from the package index (pip's build isolation), and the clean
virtualenv installs the dependencies from it, pinned by constraints.txt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, singer, usage
from tests.platforms import config_for

VERSION = "0.1.0"
SDIST_TOP = {
    "PKG-INFO",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "CHANGELOG.md",
    "Makefile",
    "constraints.txt",
    "meltano.yml",
    ".gitignore",
    ".pre-commit-config.yaml",
    "target_usage_billing",
    "tests",
    "examples",
    "meltano",
    "scripts",
    "benchmarks",
}
# What a working checkout holds beside the sources: none of it belongs in a release.
JUNK = [
    ".venv/bin/python",
    ".venv/lib/python3.11/site-packages/x.py",
    ".cache/meltano-4.4.1/bin/meltano",
    ".mypy_cache/3.10/target_usage_billing/run.data.json",  # no nested .gitignore here
    ".pytest_cache/v/cache/lastfailed",
    ".ruff_cache/0.17.5/123",
    "tests/.pytest_cache/v/cache/nodeids",
    "tests/__pycache__/conftest.cpython-311-pytest-9.2.0.pyc",
    "target_usage_billing/__pycache__/run.cpython-311.pyc",
    ".sandbox-data/m3ter.jsonl",
    ".demo/dead-letters.jsonl",
    ".meltano/run/elt/x.log",
    "target-usage-billing-journal.sqlite",
    "target-usage-billing-journal.sqlite-wal",
    "target-usage-billing-dead-letters.jsonl",
    "dead-letters.jsonl",
    "dry-run-requests.jsonl",
    "benchmarks/results/latest.json",
    "dist/target_usage_billing-0.0.9-py3-none-any.whl",
    "build/lib/target_usage_billing/__init__.py",
    "notes.txt",  # a scratch file at the top: not in the include list
]
JUNK_PARTS = {
    ".venv",
    ".cache",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    ".sandbox-data",
    ".demo",
    ".meltano",
    ".git",
    "dist",
    "build",
    "results",
}

pytestmark = pytest.mark.timeout(1200)


def checkout_files() -> list[str]:
    """The files a clone of this checkout holds (tracked, or new and not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def clean_env() -> dict[str, str]:
    # without PYTHONPATH, so the installed wheel runs and not this checkout
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("TARGET_USAGE_BILLING_")
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the checkout with a working tree's junk planted in it, built."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    files = checkout_files()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    for name in JUNK:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("junk\n")
    out = base / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"base": base, "files": files, "sdist": sdist, "wheel": wheel}


def sdist_members(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as archive:
        names = [member.name for member in archive.getmembers() if member.isfile()]
    prefix = f"target_usage_billing-{VERSION}/"
    assert all(name.startswith(prefix) for name in names)
    return {name[len(prefix) :] for name in names}


def test_the_sdist_holds_the_sources_and_none_of_the_checkouts_junk(built):
    assert built["sdist"].name == f"target_usage_billing-{VERSION}.tar.gz"
    members = sdist_members(built["sdist"])
    for needed in (
        "README.md",
        "LICENSE",
        "pyproject.toml",
        "PKG-INFO",
        "meltano/target-usage-billing.yml",
        "meltano.yml",
        "constraints.txt",
        "target_usage_billing/__init__.py",
        "target_usage_billing/sandbox/cli.py",
        "examples/segment-events.jsonl",
        "tests/conftest.py",
        "tests/test_packaging.py",
    ):
        assert needed in members, needed
    assert {name.split("/")[0] for name in members} <= SDIST_TOP
    for name in members:
        assert not set(name.split("/")) & JUNK_PARTS, name
        assert not name.endswith((".pyc", ".sqlite", ".sqlite-wal", "dead-letters.jsonl")), name
    assert not members & set(JUNK)
    # exactly the checkout's files under the included paths: nothing lost, nothing added
    expected = {name for name in built["files"] if name.split("/")[0] in SDIST_TOP}
    assert members - {"PKG-INFO"} == expected


def test_the_wheel_holds_the_package_its_commands_and_metadata(built):
    assert built["wheel"].name == f"target_usage_billing-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(built["wheel"]) as archive:
        names = set(archive.namelist())
        info = f"target_usage_billing-{VERSION}.dist-info"
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    assert {name.split("/")[0] for name in names} == {"target_usage_billing", info}
    assert "target_usage_billing/sandbox/server.py" in names  # usage-billing-sandbox runs from it
    assert f"{info}/licenses/LICENSE" in names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    assert "target-usage-billing = target_usage_billing.target:TargetUsageBilling.cli" in entry_points
    assert "usage-billing-sandbox = target_usage_billing.sandbox.cli:main" in entry_points
    assert "License-Expression: Apache-2.0" in metadata
    assert "Description-Content-Type: text/markdown" in metadata


def test_twine_check_strict_passes_both(built):
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(built["sdist"]), str(built["wheel"])],
        capture_output=True,
        text=True,
        env={**clean_env(), "NO_COLOR": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2, done.stdout


@pytest.fixture(scope="module")
def installed(built) -> Path:
    """A clean virtualenv with the wheel (and its dependencies) installed by pip."""
    venv = built["base"] / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env())
    done = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-c",
            str(ROOT / "constraints.txt"),
            str(built["wheel"]),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv


def test_the_installed_wheel_is_the_one_that_runs(installed):
    done = subprocess.run(
        [
            str(installed / "bin" / "python"),
            "-c",
            "import target_usage_billing; print(target_usage_billing.__file__)",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=installed,
        check=True,
    )
    assert Path(done.stdout.strip()).is_relative_to(installed)  # not this checkout
    about = subprocess.run(
        [str(installed / "bin" / "target-usage-billing"), "--about", "--format=json"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=installed,
    )
    assert about.returncode == 0, about.stderr
    info = json.loads(about.stdout)
    assert info["name"] == "target-usage-billing" and info["version"] == VERSION
    assert "mappings" in info["settings"]["properties"]
    sandbox_help = subprocess.run(
        [str(installed / "bin" / "usage-billing-sandbox"), "--help"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=installed,
    )
    assert sandbox_help.returncode == 0, sandbox_help.stderr


def test_the_installed_wheel_loads_usage_into_the_sandbox(installed, sandbox, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config_for("m3ter", sandbox, run_report_path="report.json")))
    lines = singer("usage", usage(12), key_properties=["id"], state={"at": 12})
    done = subprocess.run(
        [str(installed / "bin" / "target-usage-billing"), "--config", str(config_path)],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads(line) for line in done.stdout.splitlines()] == [{"at": 12}]
    assert sandbox.stats("m3ter")["stored"] == 12
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exit_code"] == 0 and report["totals"]["sent"] == 12
