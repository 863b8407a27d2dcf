"""Dagster: load usage with `meltano run`, then read it back with `reconcile`.

Under Meltano every failure of the loader is exit 1, so the load op reads the target's run
report (run_report_path) to decide: a retryable code (4 delivery failed, 7 stopped, 9 an
output could not be written) raises RetryRequested and Dagster runs the op again (a re-run
from the last STATE sends nothing twice: ids are stable); any other code raises
dagster.Failure without retries, for a person to look at. The reconcile op fails on exit 8
(the platform does not hold what the journal says it acknowledged).

  dagster job execute -f examples/dagster/usage_billing_job.py -j usage_billing_job

Settings come from the environment, as in examples/airflow/usage_billing_dag.py:

  USAGE_BILLING_MELTANO          the meltano executable (default: meltano on PATH)
  USAGE_BILLING_PROJECT          the Meltano project directory (default: the working directory)
  USAGE_BILLING_TAP              the extractor (default: tap-jsonl, as in this repository's meltano.yml)
  USAGE_BILLING_LOADER           the loader (default: target-usage-billing)
  USAGE_BILLING_REPORT_DIR       where the run reports go: load-report.json, reconcile-report.json
                                 (default: .meltano in the project)
  USAGE_BILLING_RECONCILE_ARGS   extra reconcile arguments (default: none, the last 7 days)
  USAGE_BILLING_RETRIES          retries of a retryable failure (default: 3)
  USAGE_BILLING_RETRY_DELAY_SECONDS   (default: 300)
"""

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from dagster import Failure, In, Nothing, OpExecutionContext, RetryRequested, job, op


def _setting(name: str, default: str) -> str:
    return os.environ.get(f"USAGE_BILLING_{name}", default)


def _meltano(context: OpExecutionContext, step: str, *args: str) -> tuple[int, dict[str, Any] | None]:
    """Run meltano with the run report path set; its exit code and the target's report."""
    project = Path(_setting("PROJECT", "."))
    report_path = project / _setting("REPORT_DIR", ".meltano") / f"{step}-report.json"
    # a report left by an earlier run must not be read as this run's
    report_path.unlink(missing_ok=True)
    env = {**os.environ, "TARGET_USAGE_BILLING_RUN_REPORT_PATH": str(report_path.resolve())}
    command = [_setting("MELTANO", "meltano"), *args]
    context.log.info("usage-billing: running " + shlex.join(command))
    done = subprocess.run(command, cwd=project, env=env, stdin=subprocess.DEVNULL, check=False)
    try:
        report = json.loads(report_path.read_text())
    except FileNotFoundError:
        report = None
    return done.returncode, report


def _retry(context: OpExecutionContext, message: str) -> RetryRequested:
    context.log.warning(message)
    return RetryRequested(
        max_retries=int(_setting("RETRIES", "3")),
        seconds_to_wait=float(_setting("RETRY_DELAY_SECONDS", "300")),
    )


def _judge(context: OpExecutionContext, step: str, returncode: int, report: dict[str, Any] | None) -> None:
    """Return on success; raise what tells Dagster whether a retry can help."""
    if report is None:
        if returncode == 0:
            raise Failure(f"{step}: meltano exited 0 but the target wrote no run report", allow_retries=False)
        # Meltano or the tap failed before the target could report: worth another try
        raise _retry(context, f"{step}: meltano exited {returncode} and the target wrote no run report")
    code, meaning = report["exit_code"], report["meaning"]
    context.log.info(
        f"usage-billing: {step} try {context.retry_number + 1}: meltano exit {returncode}, "
        f"target exit {code} ({meaning}), retryable {str(report['retryable']).lower()}"
    )
    if code == 0 and returncode == 0:
        return
    if code == 0:
        # the target delivered everything; the failure was the tap's or Meltano's
        raise _retry(context, f"{step}: meltano exited {returncode} after the target succeeded")
    message = f"{step}: target-usage-billing exit {code}: {meaning}: {report.get('error')}"
    if report["retryable"]:
        raise _retry(context, message)
    raise Failure(
        message, metadata={"exit_code": code, "run_report": report_summary(report)}, allow_retries=False
    )


def report_summary(report: dict[str, Any]) -> str:
    return json.dumps({k: report.get(k) for k in ("exit_code", "meaning", "retryable", "totals")})


@op
def load_usage(context: OpExecutionContext) -> None:
    """`meltano run TAP LOADER`, judged by the target's run report."""
    tap, loader = _setting("TAP", "tap-jsonl"), _setting("LOADER", "target-usage-billing")
    returncode, report = _meltano(context, "load", "run", tap, loader)
    _judge(context, "load", returncode, report)


@op(ins={"after_load": In(Nothing)})
def reconcile_usage(context: OpExecutionContext) -> None:
    """`meltano invoke LOADER:reconcile`: fails when the platform does not hold the usage."""
    loader = _setting("LOADER", "target-usage-billing")
    extra = shlex.split(_setting("RECONCILE_ARGS", ""))
    returncode, report = _meltano(context, "reconcile", "invoke", f"{loader}:reconcile", *extra)
    # exit 8, usage missing on the platform, is not retryable: reading again finds the same
    _judge(context, "reconcile", returncode, report)


@job
def usage_billing_job() -> None:
    """Load usage into the billing platform, then reconcile what it holds."""
    reconcile_usage(after_load=load_usage())
