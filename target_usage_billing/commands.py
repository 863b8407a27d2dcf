"""The command line's runs around the Target: a run, --dry-run, --reconcile and --replay,
each ending with the run report and, on failure, one clear line and the documented exit
code."""

from __future__ import annotations

import os
import signal
import typing as t

import click

from target_usage_billing.cli import exit_with, use_json_logs, wants_json_logs
from target_usage_billing.errors import ConfigError, ReconcileMismatch, UsageBillingError
from target_usage_billing.reconcile import reconcile as read_back
from target_usage_billing.replay import Replay, finish_replay, parse_stages, replay_settings
from target_usage_billing.runreport import RunReport, finish_report, open_report
from target_usage_billing.settings import check_environment

if t.TYPE_CHECKING:
    from target_usage_billing.target import TargetUsageBilling


def run_command(
    cls: type[TargetUsageBilling],
    *,
    config: t.Any,
    file_input: t.IO[str] | None,
    dry_run: bool,
    reconcile: bool,
    since: str | None,
    until: str | None,
    replay: str | None,
    stage: str | None,
) -> None:
    """One invocation: settings, the run the options ask for, its report, its exit."""
    settings = dict(config.config) if config is not None else {}
    parse_env = bool(config is not None and config.parse_env)
    if wants_json_logs(settings, cls._env_prefix() if parse_env else None):
        use_json_logs()
    cls.print_version(print_fn=cls.logger.info)
    if dry_run:
        settings["dry_run"] = True
    mode = (
        "reconcile" if reconcile else "replay" if replay else "dry_run" if settings.get("dry_run") else "run"
    )
    report = open_report(settings, cls._env_prefix() if parse_env else None, mode)
    target: TargetUsageBilling | None = None
    try:
        if (since or until) and not reconcile:
            raise ConfigError("--since and --until go with --reconcile")
        if stage and not replay:
            raise ConfigError("--stage goes with --replay")
        if replay and reconcile:
            raise ConfigError("--replay and --reconcile are two runs: give one")
        replaying = None
        if replay:
            replaying = Replay(replay, parse_stages(stage))
            replaying.scan()
            env_prefix = cls._env_prefix() if parse_env else None
            settings = replay_settings(settings, env_prefix, replaying, os.environ)
        report.check_writable()
        if parse_env:
            check_environment(cls.config_jsonschema, cls._env_prefix())
        if reconcile:
            _reconcile(cls, settings, parse_env, since, until, report)
            finish_report(report, 0)
            return
        try:
            target = cls(config=settings, validate_config=True, parse_env_config=parse_env)
        except (ValueError, TypeError) as exc:  # the SDK parsing TARGET_USAGE_BILLING_* variables
            if not parse_env:
                raise
            raise ConfigError(f"settings from environment variables: {exc}") from None
        report.run = target.billing_run
        target.report = report
        if replaying is None:
            target.run(file_input)
        else:
            target.check_unused_rules = False
            try:
                target.run(replaying.lines(target))  # type: ignore[arg-type]
            finally:
                report.fields["replay"] = replaying.figures()
            finish_replay(target, replaying)
    except UsageBillingError as exc:
        if target is not None and target._stop_signal is not None:
            report.fields["signal"] = signal.Signals(target._stop_signal).name
        finish_report(report, exc.exit_code, str(exc))
        exit_with(exc)
    except Exception as exc:  # a defect: the report says so, the traceback follows
        finish_report(report, 1, f"unexpected error: {type(exc).__name__}: {exc}")
        raise
    if target._stop_signal is not None:
        report.fields["signal"] = signal.Signals(target._stop_signal).name
        cls.logger.info("Stopped by signal; everything received was delivered")
    finish_report(report, 0)


def _reconcile(
    cls: type[TargetUsageBilling],
    settings: dict,
    parse_env: bool,
    since: str | None,
    until: str | None,
    report: RunReport,
) -> None:
    """--reconcile: settings as a run takes them (files, environment, checks), then the
    read back; the report goes to stdout."""
    target = cls(config=settings, validate_config=True, parse_env_config=parse_env, reconcile_only=True)
    defaults = {name: prop.get("default") for name, prop in cls.config_jsonschema["properties"].items()}
    outcome: dict[str, t.Any] = {}
    report.fields["reconcile"] = {}
    try:
        lines = read_back(target.config, defaults, since, until, outcome)
    except ReconcileMismatch as exc:
        click.echo("\n".join(exc.report))
        raise
    finally:
        if outcome:
            report.fields["reconcile"] = {outcome["platform"]: outcome}
    click.echo("\n".join(lines))
