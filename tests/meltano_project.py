"""A real Meltano in its own virtualenv and a Meltano project loading into the sandbox,
shared by tests/test_meltano.py and tests/test_orchestrators.py.

The tools the tests drive (Meltano, Airflow, Dagster) are not dependencies of the target:
each is installed in its own virtualenv under .cache/ (kept between local runs, rebuilt in
a fresh clone), so their pins never meet the target's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import ROOT

MELTANO_VERSION = "4.4.1"
MELTANO_VENV = ROOT / ".cache" / f"meltano-{MELTANO_VERSION}"
JOB = "dev:tap-jsonl-to-target-usage-billing"


def installed(venv: Path, requirement: str, executable: str) -> Path:
    """The executable of ``requirement`` in its own virtualenv ``venv``, installed on first use."""
    path = venv / "bin" / executable
    if not path.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", requirement],
            check=True,
            timeout=1200,
            stdin=subprocess.DEVNULL,
        )
    return path


def install_meltano() -> Path:
    return installed(MELTANO_VENV, f"meltano=={MELTANO_VERSION}", "meltano")


def build_project(directory: Path, meltano: Path) -> Path:
    """This repository's meltano.yml without the loader, which is then added the way the
    README says: from the plugin definition, with `meltano config set`."""
    document = yaml.safe_load((ROOT / "meltano.yml").read_text())
    (extractor,) = document["plugins"]["extractors"]
    (loader,) = document["plugins"].pop("loaders")
    extractor["config"]["path"] = str(ROOT / "examples" / "segment-events.jsonl")
    (directory / "meltano.yml").write_text(yaml.safe_dump(document, sort_keys=False))
    definition = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "meltano_settings.py"),
            "--definition",
            "--pip-url",
            f"-e {ROOT}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (directory / "target-usage-billing.yml").write_text(definition)
    added = run_meltano(
        meltano,
        directory,
        "add",
        "--plugin-type",
        "loader",
        "target-usage-billing",
        "--from-ref",
        "target-usage-billing.yml",
        "--no-install",
    )
    assert added.returncode == 0, added.stderr[-3000:]
    config = loader["config"]
    settings = {
        "destination": config["destination"],
        "m3ter_org_id": config["m3ter_org_id"],
        "m3ter_access_key_id": config["m3ter_access_key_id"],
        "m3ter_api_secret": config["m3ter_api_secret"],
        "mappings": json.dumps(config["mappings"]),
        "dead_letter_path": str(directory / "dead-letters.jsonl"),
    }
    for name, value in settings.items():
        done = run_meltano(meltano, directory, "config", "set", "target-usage-billing", name, value)
        assert done.returncode == 0, done.stderr[-2000:]
    listed = run_meltano(meltano, directory, "config", "list", "target-usage-billing")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "m3ter_api_secret" in listed.stdout and "sandbox-api-secret" not in listed.stdout  # sensitive
    done = run_meltano(meltano, directory, "install", timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return directory


def meltano_env(env: dict | None = None) -> dict[str, str]:
    """This process's environment without target or Meltano settings, plus ``env``."""
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("TARGET_USAGE_BILLING_", "MELTANO_"))
    }
    full_env.update(
        {
            "MELTANO_SEND_ANONYMOUS_USAGE_STATS": "false",
            "MELTANO_DISABLE_TRACKING": "true",
            "MELTANO_CLI_LOG_LEVEL": "info",
        }
    )
    full_env.update(env or {})
    return full_env


def run_meltano(meltano: Path, project: Path, *args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        [str(meltano), *args],
        cwd=project,
        env=meltano_env(env),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def expected_uids() -> set[str]:
    records = [
        json.loads(line) for line in (ROOT / "examples" / "segment-events.jsonl").read_text().splitlines()
    ]
    return {r["messageId"] for r in records if r["type"] == "track" and r["event"] == "API Request"}
