"""Real Airflow 3 and Dagster run the shipped examples against the sandbox.

examples/airflow/usage_billing_dag.py runs under `airflow dags test usage_billing`
(SQLite metadata in a temporary AIRFLOW_HOME after `airflow db migrate`), and
examples/dagster/usage_billing_job.py under `dagster job execute` (a temporary
DAGSTER_HOME). Each orchestrator is installed in its own virtualenv under .cache/ (not a
dependency of the target, and its pins differ from constraints.txt), as Meltano is; both
drive the Meltano project of tests/meltano_project.py. What is asserted is what the
platform (the sandbox) holds, the run reports the target wrote, and how many times the
orchestrator ran the load, counted from the lines the examples log on each try.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, Sandbox
from tests.meltano_project import (
    build_project,
    expected_uids,
    install_meltano,
    installed,
    meltano_env,
    run_meltano,
)

AIRFLOW_VERSION = "3.3.2"
DAGSTER_VERSION = "1.13.29"
AIRFLOW_VENV = ROOT / ".cache" / f"airflow-{AIRFLOW_VERSION}"
DAGSTER_VENV = ROOT / ".cache" / f"dagster-{DAGSTER_VERSION}"
DAG_ID = "usage_billing"
DAGSTER_JOB = ROOT / "examples" / "dagster" / "usage_billing_job.py"
# the bundled events are of 18 to 20 November 2026
RECONCILE_ARGS = "--since 2026-11-18 --until 2026-11-20"
WRONG_SECRET = "not-the-sandbox-secret"
# A Meltano environment of the project whose loader has no retry budget: the first 503
# stops a run with exit 4. (A `kind: decimal` setting given as an environment variable,
# TARGET_USAGE_BILLING_MAX_RETRY_SECONDS, stops Meltano 4.4.1 itself: "Object of type
# Decimal is not JSON serializable"; from meltano.yml it works.)
NO_RETRY_BUDGET = "no-retry-budget"

pytestmark = [pytest.mark.meltano, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def meltano() -> Path:
    return install_meltano()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, meltano: Path) -> Path:
    directory = build_project(tmp_path_factory.mktemp("meltano-project"), meltano)
    for command in (
        ["environment", "add", NO_RETRY_BUDGET],
        [
            f"--environment={NO_RETRY_BUDGET}",
            "config",
            "set",
            "target-usage-billing",
            "max_retry_seconds",
            "0",
        ],
    ):
        done = run_meltano(meltano, directory, *command)
        assert done.returncode == 0, done.stderr[-2000:]
    return directory


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The airflow executable and the environment of a migrated SQLite AIRFLOW_HOME."""
    executable = installed(AIRFLOW_VENV, f"apache-airflow=={AIRFLOW_VERSION}", "airflow")
    env = {
        "AIRFLOW_HOME": str(tmp_path_factory.mktemp("airflow-home")),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "examples" / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    done = orchestrate([str(executable), "db", "migrate"], env, ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return executable, env


@pytest.fixture(scope="module")
def dagster() -> Path:
    return installed(DAGSTER_VENV, f"dagster=={DAGSTER_VERSION}", "dagster")


def orchestrate(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    # neither the caller's orchestrator settings nor a terminal: as under CI
    outer = {
        k: v for k, v in meltano_env().items() if not k.startswith(("AIRFLOW", "DAGSTER", "USAGE_BILLING_"))
    }
    return subprocess.run(
        command,
        cwd=cwd,
        env={**outer, **env},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )


def pipeline_env(meltano: Path, project: Path, sandbox: Sandbox, reports: Path, **settings: str) -> dict:
    """The examples' settings, and the target's sandbox URLs as Meltano users give them."""
    reports.mkdir(exist_ok=True)
    return {
        "USAGE_BILLING_MELTANO": str(meltano),
        "USAGE_BILLING_PROJECT": str(project),
        "USAGE_BILLING_REPORT_DIR": str(reports),
        "USAGE_BILLING_RECONCILE_ARGS": RECONCILE_ARGS,
        "USAGE_BILLING_RETRIES": "2",
        "USAGE_BILLING_RETRY_DELAY_SECONDS": "1",
        "TARGET_USAGE_BILLING_M3TER_INGEST_URL": sandbox.url,
        "TARGET_USAGE_BILLING_M3TER_AUTH_URL": sandbox.url,
        # a journal of this test alone: tap-jsonl sends every row on each run, and the
        # sandbox forgets between tests, so a shared journal would not reconcile
        "TARGET_USAGE_BILLING_JOURNAL_PATH": str(reports / "journal.sqlite"),
        **settings,
    }


def tries(output: str, step: str) -> list[tuple[int, int]]:
    """(try, target exit code) of each try of ``step`` the example logged."""
    found = re.findall(rf"usage-billing: {step} try (\d+): meltano exit \d+, target exit (\d+)", output)
    return [(int(number), int(code)) for number, code in found]


def report(reports: Path, step: str) -> dict:
    return json.loads((reports / f"{step}-report.json").read_text())


def assert_delivered_once_and_reconciled(sandbox: Sandbox, reports: Path) -> None:
    assert {item["uid"] for item in sandbox.items("m3ter")} == expected_uids()
    stats = sandbox.stats("m3ter")
    assert stats["stored"] == len(expected_uids()) and stats["conflicts"] == 0
    loaded = report(reports, "load")
    assert loaded["mode"] == "run" and loaded["exit_code"] == 0
    assert loaded["totals"]["sent"] == len(expected_uids())
    reconciled = report(reports, "reconcile")
    assert reconciled["mode"] == "reconcile" and reconciled["exit_code"] == 0
    outcome = reconciled["reconcile"]["m3ter"]
    assert outcome["confirmed"] is True and outcome["missing"] == 0 and outcome["totals_differ"] == 0


def airflow_dags_test(airflow, meltano, project, sandbox, reports, **settings):
    executable, airflow_env = airflow
    env = {**airflow_env, **pipeline_env(meltano, project, sandbox, reports, **settings)}
    done = orchestrate([str(executable), "dags", "test", DAG_ID], env, reports)
    return done, done.stdout + done.stderr


def test_airflow_dag_loads_then_reconciles(airflow, meltano, project, sandbox, tmp_path):
    done, output = airflow_dags_test(airflow, meltano, project, sandbox, tmp_path / "reports")

    assert done.returncode == 0, output[-6000:]
    assert tries(output, "load") == [(1, 0)]
    assert tries(output, "reconcile") == [(1, 0)]
    assert_delivered_once_and_reconciled(sandbox, tmp_path / "reports")


def test_airflow_does_not_retry_refused_credentials(airflow, meltano, project, sandbox, tmp_path):
    reports = tmp_path / "reports"
    done, output = airflow_dags_test(
        airflow, meltano, project, sandbox, reports, TARGET_USAGE_BILLING_M3TER_API_SECRET=WRONG_SECRET
    )

    assert done.returncode != 0
    assert tries(output, "load") == [(1, 3)]  # one try, though two retries were allowed
    assert tries(output, "reconcile") == []  # upstream failed
    loaded = report(reports, "load")
    assert loaded["exit_code"] == 3 and loaded["retryable"] is False
    assert loaded["meaning"] == "credentials refused"
    assert sandbox.stats("m3ter")["stored"] == 0
    assert WRONG_SECRET not in output and WRONG_SECRET not in json.dumps(loaded)


def test_airflow_retries_a_delivery_failure_and_the_retry_bills_once(
    airflow, meltano, project, sandbox, tmp_path
):
    # the first ingest request fails and no retry budget is left: the first try exits 4
    sandbox.faults({"kind": "503", "count": 1})
    reports = tmp_path / "reports"
    done, output = airflow_dags_test(
        airflow, meltano, project, sandbox, reports, MELTANO_ENVIRONMENT=NO_RETRY_BUDGET
    )

    assert done.returncode == 0, output[-6000:]
    assert tries(output, "load") == [(1, 4), (2, 0)]
    assert tries(output, "reconcile") == [(1, 0)]
    assert sandbox.stats("m3ter")["faults_applied"] == 1
    assert_delivered_once_and_reconciled(sandbox, reports)


def test_airflow_fails_without_retry_when_reconcile_finds_usage_missing(
    airflow, meltano, project, sandbox, tmp_path
):
    # every 7th new item is acknowledged and never stored: only a read-back can tell
    sandbox.faults({"kind": "lost-after-ack", "every": 7, "destination": "m3ter"})
    reports = tmp_path / "reports"
    done, output = airflow_dags_test(airflow, meltano, project, sandbox, reports)

    assert done.returncode != 0
    assert tries(output, "load") == [(1, 0)]
    assert tries(output, "reconcile") == [(1, 8)]  # one try, though two retries were allowed
    reconciled = report(reports, "reconcile")
    assert reconciled["exit_code"] == 8 and reconciled["reconcile"]["m3ter"]["confirmed"] is False
    assert sandbox.stats("m3ter")["lost_after_ack"] > 0


def dagster_job_execute(dagster, meltano, project, sandbox, tmp_path, **settings):
    reports = tmp_path / "reports"
    home = tmp_path / "dagster-home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {"DAGSTER_HOME": str(home), **pipeline_env(meltano, project, sandbox, reports, **settings)}
    command = [str(dagster), "job", "execute", "-f", str(DAGSTER_JOB), "-j", "usage_billing_job"]
    done = orchestrate(command, env, tmp_path)
    return done, done.stdout + done.stderr


def test_dagster_job_loads_then_reconciles(dagster, meltano, project, sandbox, tmp_path):
    done, output = dagster_job_execute(dagster, meltano, project, sandbox, tmp_path)

    assert done.returncode == 0, output[-6000:]
    assert tries(output, "load") == [(1, 0)]
    assert tries(output, "reconcile") == [(1, 0)]
    assert_delivered_once_and_reconciled(sandbox, tmp_path / "reports")


def test_dagster_does_not_retry_refused_credentials(dagster, meltano, project, sandbox, tmp_path):
    done, output = dagster_job_execute(
        dagster, meltano, project, sandbox, tmp_path, TARGET_USAGE_BILLING_M3TER_API_SECRET=WRONG_SECRET
    )

    assert done.returncode != 0
    assert tries(output, "load") == [(1, 3)]
    assert tries(output, "reconcile") == []
    loaded = report(tmp_path / "reports", "load")
    assert loaded["exit_code"] == 3 and loaded["retryable"] is False
    assert sandbox.stats("m3ter")["stored"] == 0
    assert WRONG_SECRET not in output


def test_dagster_retries_a_delivery_failure_and_the_retry_bills_once(
    dagster, meltano, project, sandbox, tmp_path
):
    sandbox.faults({"kind": "503", "count": 1})
    done, output = dagster_job_execute(
        dagster, meltano, project, sandbox, tmp_path, MELTANO_ENVIRONMENT=NO_RETRY_BUDGET
    )

    assert done.returncode == 0, output[-6000:]
    assert tries(output, "load") == [(1, 4), (2, 0)]
    assert tries(output, "reconcile") == [(1, 0)]
    assert_delivered_once_and_reconciled(sandbox, tmp_path / "reports")
