"""The run report: one JSON file an orchestrator reads after the run (run_report_path).

Under Meltano every failure of the target becomes exit 1, and an orchestrator's SIGTERM
can hide the target's last lines: the report keeps the target's own exit code, what it
means, the figures of the summary, the dead letters and the STATE released. It is
written at the end of every run (failed, stopped or reconcile runs too), atomically: a
temporary file beside it, made durable, then renamed over it, so a reader never sees half
a report. Secrets never appear in it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
import tempfile
import typing as t
from pathlib import Path

import msgspec

from target_usage_billing.errors import OutputError

if t.TYPE_CHECKING:
    from target_usage_billing.run import BillingRun

REPORT_VERSION = 1
# The target's own exit codes (errors.py), as the report's "meaning" says them.
MEANINGS = {
    0: "success",
    1: "unexpected error (a defect in the target)",
    2: "invalid settings",
    3: "credentials refused",
    4: "delivery failed",
    5: "bad input",
    6: "too many rejected records",
    7: "stopped by a signal before everything received was delivered",
    8: "reconcile: the platform does not hold everything the journal says it acknowledged",
    9: "an output could not be written",
}
# Exit codes a plain re-run may cure (an outage, a stop signal, a locked file), as
# opposed to ones that need a person (settings, credentials, input, rejections).
RETRYABLE = frozenset({4, 7, 9})
STREAM_FIGURES = (
    "read",
    "filtered",
    "unmapped",
    "mapped",
    "sent",
    "duplicates",
    "already_stored",
    "rejected",
    "requests",
    "retries",
)
MAPPING_FIGURES = ("filtered", "mapped", "sent", "duplicates", "already_stored", "rejected")

_encoder = msgspec.json.Encoder(decimal_format="number")
_state_decoder = msgspec.json.Decoder(float_hook=decimal.Decimal)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_figures(run: BillingRun) -> dict[str, t.Any]:
    """What a run did, as the report's fields: per stream (and per mapping), totals,
    dead letters, the STATE released, the journal."""
    stats = run.stats
    streams: dict[str, t.Any] = {}
    with stats.lock:
        for name, s in sorted(stats.streams.items()):
            entry: dict[str, t.Any] = {figure: getattr(s, figure) for figure in STREAM_FIGURES}
            by_stage: dict[str, int] = {}
            for reason, count in s.reasons.items():
                stage = reason.split(":", 1)[0]
                by_stage[stage] = by_stage.get(stage, 0) + count
            entry["rejected_by_stage"] = by_stage
            plan = run.plan_by_stream.get(name)
            entry["mappings"] = {}
            if plan is not None and not plan.skip:
                for rule in plan.rules:
                    share = s.mappings.get(rule.label, s)
                    entry["mappings"][rule.label] = {f: getattr(share, f) for f in MAPPING_FIGURES}
            streams[name] = entry
    totals = {figure: sum(s[figure] for s in streams.values()) for figure in STREAM_FIGURES}
    last = run.last_state_emitted
    return {
        "dry_run": run.dry_run is not None,
        "duration_seconds": round(stats.elapsed, 3),
        "streams": streams,
        "totals": totals,
        "dead_letters": {"path": str(run.dead_letters.path.resolve()), "count": run.dead_letters.count},
        "state": {
            "emitted": run.states_emitted,
            "withheld": run.states_withheld,
            "last": None if last is None else _state_decoder.decode(last),
        },
        "journal": None
        if run.journal is None
        else {
            "where": run.journal.store.where,
            "acknowledged_items": run.journal.acknowledged_items,
        },
    }


class RunReport:
    """The report of one invocation, filled in as it goes and written once at the end."""

    def __init__(self, path: str | None, mode: str):
        self.path = Path(path).resolve() if path else None
        self.fields: dict[str, t.Any] = {
            "report_version": REPORT_VERSION,
            "mode": mode,  # run | dry_run | reconcile | replay
            "exit_code": None,
            "meaning": None,
            "retryable": None,
            "error": None,
            "destination": None,
            "run_id": None,
            "started_at": now(),
            "finished_at": None,
            "signal": None,
        }
        self.run: BillingRun | None = None
        self.secrets: list[str] = []
        self.written = False

    def check_writable(self) -> None:
        """At start-up: a report that could not be written is a settings error (exit 2)."""
        if self.path is None:
            return
        directory = self.path.parent
        if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
            from target_usage_billing.errors import ConfigError

            why = "no such directory" if not directory.is_dir() else "the directory is not writable"
            raise ConfigError(f"run_report_path: cannot write {str(self.path)!r}: {why}")

    def document(self, exit_code: int, error: str | None) -> dict[str, t.Any]:
        fields = dict(self.fields)
        run = self.run
        if run is not None:
            fields["destination"] = run.destination.name
            fields["run_id"] = run.dead_letters.run_id
            fields.update(run_figures(run))
        fields.update(
            exit_code=exit_code,
            meaning=MEANINGS.get(exit_code, "unknown"),
            retryable=exit_code in RETRYABLE,
            error=self._redact(error) if error else None,
            finished_at=now(),
        )
        return fields

    def _redact(self, text: str) -> str:
        secrets = list(self.secrets)
        if self.run is not None:
            secrets += [*self.run.secrets, *self.run.destination.live_secrets()]
        for secret in secrets:
            if secret:
                text = text.replace(secret, "***")
        return text.split("\n", 1)[0]

    def write(self, exit_code: int, error: str | None = None) -> None:
        """Write the report (once): temporary file, fsync, rename. OutputError on failure."""
        if self.path is None or self.written:
            return
        self.written = True
        data = _encoder.encode(self.document(exit_code, error)) + b"\n"
        for secret in self.secrets:
            if secret:
                data = data.replace(secret.encode(), b"***")
        try:
            fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise OutputError(f"run_report_path: cannot write {str(self.path)!r}: {reason}") from None


def open_report(settings: t.Mapping[str, t.Any], env_prefix: str | None, mode: str) -> RunReport:
    """The report the settings ask for (``env_prefix``: settings come from environment
    variables too), knowing every secret the settings hold so that none reaches it."""
    from target_usage_billing.settings import config_schema

    def setting(name: str) -> t.Any:
        value = settings.get(name)
        if value in (None, "") and env_prefix:
            value = os.environ.get(env_prefix + name.upper())
        return value

    report = RunReport(setting("run_report_path"), mode)
    destination = setting("destination")
    report.fields["destination"] = destination if isinstance(destination, str) else None
    for name, prop in config_schema()["properties"].items():
        value = setting(name) if prop.get("secret") else None
        if isinstance(value, str) and value:
            report.secrets.append(value)
    return report


def finish_report(report: RunReport, exit_code: int, error: str | None = None) -> None:
    """Write the report; one that cannot be written makes a successful run exit 9."""
    from target_usage_billing.cli import PLUGIN_NAME, exit_with

    try:
        report.write(exit_code, error)
    except OutputError as exc:
        if exit_code == 0:
            exit_with(exc)
        import logging

        logging.getLogger(PLUGIN_NAME).error("%s", exc)
