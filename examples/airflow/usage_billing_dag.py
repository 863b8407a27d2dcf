"""Airflow 3: load usage with `meltano run`, then read it back with `reconcile`.

Under Meltano every failure of the loader is exit 1, so the load task reads the target's
run report (run_report_path) to decide: a retryable code (4 delivery failed, 7 stopped,
9 an output could not be written) raises AirflowException and Airflow retries the task
(a re-run from the last STATE sends nothing twice: ids are stable); any other code raises
AirflowFailException, which fails the task at once, for a person to look at. The reconcile
task fails on exit 8 (the platform does not hold what the journal says it acknowledged).

Copy it into your dags folder and set, in the scheduler's and workers' environment:

  USAGE_BILLING_MELTANO          the meltano executable (default: meltano on PATH)
  USAGE_BILLING_PROJECT          the Meltano project directory (default: the working directory)
  USAGE_BILLING_TAP              the extractor (default: tap-jsonl, as in this repository's meltano.yml)
  USAGE_BILLING_LOADER           the loader (default: target-usage-billing)
  USAGE_BILLING_REPORT_DIR       where the run reports go: load-report.json, reconcile-report.json
                                 (default: .meltano in the project)
  USAGE_BILLING_RECONCILE_ARGS   extra reconcile arguments (default: none, the last 7 days)
  USAGE_BILLING_RETRIES          retries of a retryable failure (default: 3)
  USAGE_BILLING_RETRY_DELAY_SECONDS   (default: 300)
  USAGE_BILLING_SCHEDULE         (default: @daily)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException

DAG_ID = "usage_billing"


def _setting(name: str, default: str) -> str:
    return os.environ.get(f"USAGE_BILLING_{name}", default)


def _meltano(step: str, *args: str) -> tuple[int, dict[str, Any] | None]:
    """Run meltano with the run report path set; its exit code and the target's report."""
    project = Path(_setting("PROJECT", "."))
    report_path = project / _setting("REPORT_DIR", ".meltano") / f"{step}-report.json"
    # a report left by an earlier run must not be read as this run's
    report_path.unlink(missing_ok=True)
    env = {**os.environ, "TARGET_USAGE_BILLING_RUN_REPORT_PATH": str(report_path.resolve())}
    command = [_setting("MELTANO", "meltano"), *args]
    print("usage-billing: running " + shlex.join(command), flush=True)
    done = subprocess.run(command, cwd=project, env=env, stdin=subprocess.DEVNULL, check=False)
    try:
        report = json.loads(report_path.read_text())
    except FileNotFoundError:
        report = None
    return done.returncode, report


def _judge(step: str, returncode: int, report: dict[str, Any] | None, try_number: int) -> None:
    """Return on success; raise what tells Airflow whether a retry can help."""
    if report is None:
        if returncode == 0:
            raise AirflowFailException(f"{step}: meltano exited 0 but the target wrote no run report")
        # Meltano or the tap failed before the target could report: worth another try
        raise AirflowException(f"{step}: meltano exited {returncode} and the target wrote no run report")
    code, meaning = report["exit_code"], report["meaning"]
    print(
        f"usage-billing: {step} try {try_number}: meltano exit {returncode}, target exit {code} "
        f"({meaning}), retryable {str(report['retryable']).lower()}",
        flush=True,
    )
    if code == 0 and returncode == 0:
        return
    if code == 0:
        # the target delivered everything; the failure was the tap's or Meltano's
        raise AirflowException(f"{step}: meltano exited {returncode} after the target succeeded")
    message = f"{step}: target-usage-billing exit {code}: {meaning}: {report.get('error')}"
    if report["retryable"]:
        raise AirflowException(message)
    raise AirflowFailException(message)


@dag(
    dag_id=DAG_ID,
    schedule=_setting("SCHEDULE", "@daily"),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,  # two loads of one Meltano state id must not overlap
    default_args={
        "retries": int(_setting("RETRIES", "3")),
        "retry_delay": dt.timedelta(seconds=float(_setting("RETRY_DELAY_SECONDS", "300"))),
    },
    tags=["usage-billing", "meltano"],
)
def usage_billing() -> None:
    """Load usage into the billing platform, then reconcile what it holds."""

    @task
    def load(ti: Any = None) -> None:
        tap, loader = _setting("TAP", "tap-jsonl"), _setting("LOADER", "target-usage-billing")
        returncode, report = _meltano("load", "run", tap, loader)
        _judge("load", returncode, report, ti.try_number)

    @task
    def reconcile(ti: Any = None) -> None:
        loader = _setting("LOADER", "target-usage-billing")
        extra = shlex.split(_setting("RECONCILE_ARGS", ""))
        returncode, report = _meltano("reconcile", "invoke", f"{loader}:reconcile", *extra)
        # exit 8, usage missing on the platform, is not retryable: reading again finds the same
        _judge("reconcile", returncode, report, ti.try_number)

    load() >> reconcile()


usage_billing()
