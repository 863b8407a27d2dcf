"""Real Meltano: `meltano run tap-jsonl target-usage-billing` with this project's meltano.yml.

Meltano is installed in its own virtualenv by the test (it is not a dependency of the
target), cached in .cache/ between local runs. The project file is copied to a temporary
directory with the loader pointing at this checkout, and the sandbox URL given the way
Meltano users give settings: environment variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

MELTANO_VERSION = "4.4.1"
MELTANO_VENV = ROOT / ".cache" / f"meltano-{MELTANO_VERSION}"
JOB = "dev:tap-jsonl-to-target-usage-billing"

pytestmark = [pytest.mark.meltano, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def meltano() -> Path:
    executable = MELTANO_VENV / "bin" / "meltano"
    if not executable.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MELTANO_VENV)], check=True)
        subprocess.run(
            [str(MELTANO_VENV / "bin" / "pip"), "install", "--quiet", f"meltano=={MELTANO_VERSION}"],
            check=True,
            timeout=1200,
        )
    return executable


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, meltano: Path) -> Path:
    directory = tmp_path_factory.mktemp("meltano-project")
    document = yaml.safe_load((ROOT / "meltano.yml").read_text())
    (extractor,) = document["plugins"]["extractors"]
    (loader,) = document["plugins"]["loaders"]
    extractor["config"]["path"] = str(ROOT / "examples" / "segment-events.jsonl")
    loader["pip_url"] = f"-e {ROOT}"
    loader["config"]["dead_letter_path"] = str(directory / "dead-letters.jsonl")
    (directory / "meltano.yml").write_text(yaml.safe_dump(document, sort_keys=False))
    done = run_meltano(meltano, directory, "install", timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return directory


def run_meltano(meltano: Path, project: Path, *args: str, env: dict | None = None, timeout: float = 600):
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
    return subprocess.run(
        [str(meltano), *args],
        cwd=project,
        env=full_env,
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


def test_meltano_run_delivers_once_and_resumes_without_billing_twice(meltano, project, sandbox):
    env = {
        "TARGET_USAGE_BILLING_M3TER_INGEST_URL": sandbox.url,
        "TARGET_USAGE_BILLING_M3TER_AUTH_URL": sandbox.url,
    }
    first = run_meltano(meltano, project, "run", "tap-jsonl", "target-usage-billing", env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    items = sandbox.items("m3ter")
    assert {item["uid"] for item in items} == expected_uids()
    assert all(item["meter"] == "api_requests" and item["ts"].endswith("Z") for item in items)
    state = run_meltano(meltano, project, "state", "get", JOB)
    assert state.returncode == 0, state.stderr[-2000:]
    assert "segment_events" in state.stdout  # Meltano stored the STATE the target released

    second = run_meltano(meltano, project, "run", "tap-jsonl", "target-usage-billing", env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    stats = sandbox.stats("m3ter")
    assert stats["stored"] == len(expected_uids())  # nothing billed twice
    assert stats["conflicts"] == 0  # anything sent again was identical


def test_meltano_invoke_about_lists_the_settings(meltano, project):
    done = run_meltano(meltano, project, "invoke", "target-usage-billing", "--about", "--format=json")
    assert done.returncode == 0, done.stderr[-2000:]
    about = json.loads(done.stdout[done.stdout.index("{") :])
    assert "mappings" in about["settings"]["properties"]
