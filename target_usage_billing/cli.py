"""What the command line adds around the Target: --config files checked, --dry-run and
--log-level, one clear line and the documented exit code for every failure, and no
secret in any log line."""

from __future__ import annotations

import json
import logging
import sys
import typing as t
from pathlib import Path

import click

from target_usage_billing.errors import ConfigError, UsageBillingError

PLUGIN_NAME = "target-usage-billing"


class RedactSecrets(logging.Filter):
    """Last line of defence: no log line shows a secret or an access token."""

    def __init__(self, secrets: t.Callable[[], list[str]]):
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        """Replace every secret in the record's message with ``***``; the record is kept."""
        secrets = [s for s in self._secrets() if s]
        if secrets:
            message = record.getMessage()
            redacted = message
            for secret in secrets:
                redacted = redacted.replace(secret, "***")
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


def exit_with(exc: UsageBillingError) -> t.NoReturn:
    """The one line an operator sees (and, at ERROR level, what log collectors see)."""
    logging.getLogger(PLUGIN_NAME).error("%s", exc)
    click.echo(f"{PLUGIN_NAME}: error: {exc}", err=True)
    sys.exit(exc.exit_code)


def check_config_files(paths: tuple[str, ...]) -> None:
    """Each --config file must hold a JSON object; a bad one is one line and exit 2."""
    for path in paths:
        if path == "ENV":
            continue
        try:
            content = json.loads(Path(path).read_bytes(), parse_constant=_refuse_constant)
        except FileNotFoundError:
            exit_with(ConfigError(f"--config {path}: no such file"))
        except OSError as exc:
            exit_with(ConfigError(f"--config {path}: cannot read it ({exc.strerror})"))
        except _NonFinite as exc:
            exit_with(ConfigError(f"--config {path}: {exc} is not valid JSON; settings take finite numbers"))
        except ValueError as exc:
            exit_with(ConfigError(f"--config {path}: not valid JSON ({exc})"))
        if not isinstance(content, dict):
            exit_with(ConfigError(f"--config {path}: must hold a JSON object of settings"))


class _NonFinite(Exception):
    pass


def _refuse_constant(name: str) -> t.NoReturn:
    raise _NonFinite(name)  # NaN, Infinity, -Infinity: Python's json reads them, JSON has none


def extra_options() -> list[click.Option]:
    """--dry-run and --log-level, beside the SDK's own options."""
    return [
        click.Option(
            ["--dry-run"],
            is_flag=True,
            default=False,
            help="Write the request bodies to dry_run_path instead of sending them.",
        ),
        click.Option(
            ["--reconcile"],
            is_flag=True,
            default=False,
            help="Read back from the platform what the run journal says it acknowledged, and "
            "compare (exit 8 when anything is missing or invalid). Reads no input.",
        ),
        click.Option(
            ["--since"], help="With --reconcile: the first day (ISO 8601; default 7 days ago, UTC)."
        ),
        click.Option(["--until"], help="With --reconcile: the last day (ISO 8601; default today, UTC)."),
        click.Option(
            ["--log-level"],
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
            expose_value=False,
            is_eager=True,
            callback=_set_log_level,
            help="Log level (also TARGET_USAGE_BILLING_LOGLEVEL).",
        ),
    ]


def _set_log_level(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        logging.getLogger().setLevel(value.upper())
        logging.getLogger(PLUGIN_NAME).setLevel(value.upper())
