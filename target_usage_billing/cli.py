"""What the command line adds around the Target: --config files checked, --dry-run and
--log-level, one clear line and the documented exit code for every failure, and no
secret in any log line."""

from __future__ import annotations

import json
import logging
import os
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
    """The one line an operator sees (and, at ERROR level, what log collectors see); with
    JSON logs only the logged event, so that every stderr line stays one JSON object."""
    logging.getLogger(PLUGIN_NAME).error("%s", exc, extra={"exit_code": exc.exit_code})
    if not json_logs.enabled:
        click.echo(f"{PLUGIN_NAME}: error: {exc}", err=True)
    sys.exit(exc.exit_code)


class _JsonLogs:
    enabled = False


json_logs = _JsonLogs()


def use_json_logs() -> None:
    """Every log line on stderr one JSON object: the singer-sdk's own structured format
    (what SINGER_SDK_LOG_CONFIG can also select), on the handlers it set up. Python
    warnings and a defect's traceback become events too."""
    if json_logs.enabled:
        return
    from singer_sdk.logging import StructuredFormatter

    json_logs.enabled = True
    formatter = StructuredFormatter(defaults={"app_name": PLUGIN_NAME})
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    logging.captureWarnings(True)

    def log_defect(kind: type[BaseException], value: BaseException, trace: t.Any) -> None:
        logging.getLogger(PLUGIN_NAME).critical("unexpected error: %s", value, exc_info=(kind, value, trace))

    sys.excepthook = log_defect


def wants_json_logs(settings: t.Mapping[str, t.Any], env_prefix: str | None) -> bool:
    """log_format: json in the settings (or its environment variable with --config ENV)."""
    value = settings.get("log_format")
    if value in (None, "") and env_prefix:
        value = os.environ.get(env_prefix + "LOG_FORMAT")
    return value == "json"


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
            ["--replay"],
            metavar="DEAD_LETTERS.jsonl",
            help="Send the records of a dead-letter file again, through the current mapping "
            "(ids unchanged); records rejected again go to a new dead-letter file beside it. "
            "Reads no input, writes no STATE.",
        ),
        click.Option(
            ["--stage"],
            metavar="STAGES",
            help="With --replay: the dead-letter stages to replay, comma-separated (default "
            "mapping,validation,api; also schema, conflict; input and platform letters hold no record).",
        ),
        click.Option(
            ["--log-format"],
            type=click.Choice(["text", "json"], case_sensitive=False),
            expose_value=False,
            is_eager=True,
            callback=_set_log_format,
            help="json: every log line one JSON object, the summary one event (also log_format).",
        ),
        click.Option(
            ["--log-level"],
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
            expose_value=False,
            is_eager=True,
            callback=_set_log_level,
            help="Log level (also TARGET_USAGE_BILLING_LOGLEVEL).",
        ),
    ]


def _set_log_format(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value and value.lower() == "json":
        use_json_logs()


def _set_log_level(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        logging.getLogger().setLevel(value.upper())
        logging.getLogger(PLUGIN_NAME).setLevel(value.upper())
