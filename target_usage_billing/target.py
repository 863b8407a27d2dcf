"""target-usage-billing: the Target class, its settings, and how it starts and stops."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import time
import typing as t
from pathlib import Path

import click
from singer_sdk import typing as th
from singer_sdk.exceptions import (
    ConfigValidationError,
    InvalidRecord,
    MissingKeyPropertiesError,
    RecordsWithoutSchemaException,
)
from singer_sdk.helpers.capabilities import PluginCapabilities
from singer_sdk.mapper import SameRecordTransform
from singer_sdk.plugin_base import _ConfigInput
from singer_sdk.singerlib.exceptions import InvalidInputLine
from singer_sdk.target_base import Target

from target_usage_billing.destinations import DESTINATIONS
from target_usage_billing.errors import (
    ConfigError,
    InputError,
    InterruptedRun,
    RejectionLimitError,
    StreamMappingError,
    UsageBillingError,
)
from target_usage_billing.mapping import MappingRejection
from target_usage_billing.reader import LineReader, StopRequested, read_batch_files
from target_usage_billing.run import BillingRun
from target_usage_billing.sinks import UsageSink

# A second stop signal this soon after the first is the same request (Meltano sends
# SIGINT then SIGTERM on Ctrl-C); later, it means "exit now".
SIGNAL_DEBOUNCE_SECONDS = 3.0
_INPUT_ERRORS = (
    RecordsWithoutSchemaException,
    MissingKeyPropertiesError,
    InvalidInputLine,
    InvalidRecord,
)

COMMON_SETTINGS = th.PropertiesList(
    th.Property(
        "destination",
        th.StringType,
        required=True,
        allowed_values=list(DESTINATIONS),
        description="Billing platform to load: " + " or ".join(DESTINATIONS) + ".",
    ),
    th.Property(
        "mappings",
        th.ArrayType(th.ObjectType(additional_properties=True)),
        required=True,
        description="Rules turning records into payloads: a list of "
        '{"stream": NAME_OR_GLOB, "preset": NAME?, "filter": JMESPATH?, "fields": {FIELD: JMESPATH}}. '
        "The first rule whose stream pattern matches applies.",
    ),
    th.Property(
        "batch_max_bytes",
        th.IntegerType,
        description="Largest request body in bytes; the destination's hard cap always applies "
        "(m3ter: under 512,000).",
    ),
    th.Property(
        "max_requests_in_flight",
        th.IntegerType,
        default=8,
        description="Requests sent concurrently while reading goes on; bounds memory too.",
    ),
    th.Property(
        "max_requests_per_second",
        th.NumberType,
        description="Client-side request rate limit. Default: the destination's published "
        "limit (m3ter: 50/s and 5,000 per 5 min; Metronome: none). 0 turns it off.",
    ),
    th.Property(
        "request_timeout_seconds",
        th.NumberType,
        default=60,
        description="Seconds to wait for an answer before the request counts as failed and is retried.",
    ),
    th.Property(
        "max_retry_seconds",
        th.NumberType,
        default=600,
        description="Retry budget: how long transient failures (429, 5xx, timeouts, dropped "
        "connections) are retried before the run stops with an error.",
    ),
    th.Property(
        "state_checkpoint_seconds",
        th.NumberType,
        default=30,
        description="Longest time received usage waits in a partial batch, also while the tap "
        "is quiet; each STATE is emitted as soon as everything before it is acknowledged. "
        "Values under 1 (0 included) mean 1 second: batches are never cut smaller because "
        "of time alone (batch_size_rows makes requests smaller).",
    ),
    th.Property(
        "shutdown_grace_seconds",
        th.NumberType,
        default=30,
        description="On SIGTERM/SIGINT, how long to keep delivering what was already received.",
    ),
    th.Property(
        "dead_letter_path",
        th.StringType,
        default="target-usage-billing-dead-letters.jsonl",
        description="JSONL file receiving every rejected record with the reason (relative "
        "paths: from the working directory, the project root under Meltano). Created when "
        "the run starts, removed at the end if nothing was rejected.",
    ),
    th.Property(
        "unmatched_streams",
        th.StringType,
        default="fail",
        allowed_values=["fail", "skip"],
        description="A stream no mapping rule matches: fail (stop before any of its records "
        "is checkpointed, naming the closest rule) or skip (count its records, send "
        'nothing). A rule {"stream": NAME, "skip": true} skips one stream on purpose.',
    ),
    th.Property(
        "max_rejected_records",
        th.IntegerType,
        description="Stop with an error once more records than this were rejected (default: no count limit).",
    ),
    th.Property(
        "max_rejected_ratio",
        th.NumberType,
        default=0.05,
        description="Stop with an error once more than this share of mappable records was "
        "rejected (judged after 1,000 records and at the end).",
    ),
    th.Property(
        "dry_run",
        th.BooleanType,
        default=False,
        description="Write the exact request bodies to dry_run_path instead of sending them; "
        "no credentials needed, and no STATE is written (nothing was billed).",
    ),
    th.Property(
        "dry_run_path",
        th.StringType,
        default="dry-run-requests.jsonl",
        description="Where a dry run writes its request bodies (JSONL, one line per request).",
    ),
    th.Property(
        "progress_interval_seconds",
        th.NumberType,
        default=10,
        description="Seconds between progress lines on stderr (0: none).",
    ),
    th.Property(
        "validate_records",
        th.BooleanType,
        default=False,
        description="Validate records against the stream's JSON Schema. Off by default: "
        "mapped payloads are checked field by field anyway.",
    ),
)


_DESTINATION_SETTINGS = {prop.name for d in DESTINATIONS.values() for prop in d.settings}


def _config_schema() -> dict:
    schema = COMMON_SETTINGS.to_dict()
    for destination in DESTINATIONS.values():
        for prop in destination.settings:
            entry = prop.to_dict()
            if prop.name in destination.required_settings:
                # JSON Schema cannot say "required when destination is X" in a way --about,
                # the README and Meltano show: the description says it, and the Meltano
                # plugin definition's settings_group_validation enforces it.
                entry[prop.name]["description"] += (
                    f" Required with destination {destination.name} (not for dry runs)."
                )
            schema["properties"].update(entry)
    return schema


class _RedactSecrets(logging.Filter):
    """Last line of defence: no log line shows a secret or an access token."""

    def __init__(self, secrets: t.Callable[[], list[str]]):
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = [s for s in self._secrets() if s]
        if secrets:
            message = record.getMessage()
            redacted = message
            for secret in secrets:
                redacted = redacted.replace(secret, "***")
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


class TargetUsageBilling(Target):
    """Loads usage records into billing platforms: m3ter measurements, Metronome events."""

    name = "target-usage-billing"
    config_jsonschema = _config_schema()
    default_sink_class = UsageSink
    message_reader_class = LineReader
    capabilities: t.ClassVar[list] = [*Target.capabilities, PluginCapabilities.BATCH]

    def __init__(self, **kwargs: t.Any):
        super().__init__(**kwargs)
        defaults = {name: prop.get("default") for name, prop in self.config_jsonschema["properties"].items()}
        self.run_context = BillingRun(self.config, defaults)
        # Drains only hand batches to the delivery pipeline, which is where the parallelism is.
        self.max_parallelism = 1
        self._stop_signal: int | None = None
        self._stop_signal_at = 0.0
        self._phase = "starting"  # then "reading", then "finishing"
        self._completed = False
        # streams whose records go straight to their sink (no stream map, no flattening)
        self._direct_sinks: dict[str, UsageSink] = {}
        self._install_redaction()
        reader = self.message_reader
        reader.idle_timeout = self.run_context.seconds_until_flush
        reader.on_idle = self._on_idle
        reader.on_unknown_message = lambda kind: self.run_context.skipped_messages.update([kind])

    # --- configuration -------------------------------------------------------------------

    def _validate_config(self, *, raise_errors: bool = True) -> list[str]:
        properties = self.config_jsonschema["properties"]
        for name, prop in properties.items():
            value = self._config.get(name)
            if not isinstance(value, str):
                continue
            if "number" in str(prop.get("type")):
                # Environment variables arrive as strings: read numbers as numbers.
                try:
                    self._config[name] = float(value)
                except ValueError:
                    pass  # left for the schema check to report
            elif value != value.strip() and (prop.get("secret") or name in _DESTINATION_SETTINGS):
                # A token pasted with its newline would break the request header.
                self._config[name] = value.strip()
        try:
            return super()._validate_config(raise_errors=raise_errors)
        except ConfigValidationError as exc:
            errors = "; ".join(exc.errors)
            for name, prop in properties.items():  # never echo a secret, even a mistyped one
                value = self._config.get(name)
                if prop.get("secret") and value not in (None, ""):
                    for shown in {str(value), repr(value), json.dumps(value, default=str)}:
                        errors = errors.replace(shown, "(secret value not shown)")
            raise ConfigError("invalid settings: " + errors) from None

    def _install_redaction(self) -> None:
        run = self.run_context

        def secrets() -> list[str]:
            return [*run.secrets, *run.destination.live_secrets()]

        redact = _RedactSecrets(secrets)
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, _RedactSecrets) for f in handler.filters):
                handler.addFilter(redact)

    # --- message handling ----------------------------------------------------------------

    def _process_schema_message(self, message_dict: dict) -> None:
        stream = message_dict.get("stream")
        keys = message_dict.get("key_properties")
        if not isinstance(stream, str) or not stream:
            raise InputError("a SCHEMA message needs a stream name")
        if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            msg = f"key_properties must be a list of property names, got {keys!r}"[:300]
            raise InputError(msg)
        if not isinstance(message_dict.get("schema"), dict):
            raise InputError("a SCHEMA message's schema must be a JSON object")
        super()._process_schema_message(message_dict)
        self._direct_sinks.pop(stream, None)
        maps = self.mapper.stream_maps.get(stream, [])
        if (
            len(maps) == 1
            and type(maps[0]) is SameRecordTransform
            and not maps[0].flattening_enabled
            and maps[0].stream_alias == stream
        ):
            sink = self._sinks_active.get(stream)
            if isinstance(sink, UsageSink) and not sink.include_sdc_metadata_properties:
                self._direct_sinks[stream] = sink

    def _process_record_message(self, message_dict: dict) -> None:
        run = self.run_context
        run.records_seen += 1
        stream = message_dict.get("stream")
        sink = self._direct_sinks.get(stream)  # type: ignore[arg-type]
        record = message_dict.get("record")
        if type(record) is not dict and stream in self.mapper.stream_maps:
            # Not a record at all (null, a list, a number): kept and counted, not mapped.
            got = "null" if record is None else type(record).__name__
            problem = MappingRejection(f"a RECORD's record must be a JSON object, got {got}")
            run.stats.stream(stream).read += 1  # type: ignore[arg-type]
            run.reject(stream, record, "input", problem, line=self.message_reader.line_number)  # type: ignore[arg-type]
        elif sink is not None:
            sink.process_direct(record)  # type: ignore[arg-type]
        elif not isinstance(stream, str):
            raise InputError(f"a message's stream must be a string, got {type(stream).__name__}")
        else:  # stream maps, flattening or record metadata: the SDK's full path
            super()._process_record_message(message_dict)
        # Time is looked at every 64 records (and at every STATE, and when input is
        # quiet): a clock read per record cost more than the check is worth.
        if not run.records_seen & 63 and run.flush_due():
            self._flush()

    def _process_state_message(self, message_dict: dict) -> None:
        # The SDK's own STATE handling is bypassed (its _latest_state stays None, so its
        # drains never write STATE): a STATE is released only once delivery caught up.
        self._assert_line_requires(message_dict, requires={"value"})
        self.run_context.state_received(message_dict["value"])
        if self.run_context.flush_due():
            self._flush()

    def _process_batch_message(self, message_dict: dict) -> None:
        # The SDK reads a whole BATCH file into memory and hands it to process_batch in
        # one piece; here every row takes the RECORD path (mapping, dead letters, ids,
        # STATE release, stream maps), streamed from the file.
        stream = message_dict.get("stream")
        if stream not in self.mapper.stream_maps:
            msg = f"BATCH for stream {stream!r} before its SCHEMA"
            raise InputError(msg)
        reader = self.message_reader
        try:
            for record in read_batch_files(reader, message_dict):
                self._process_record_message({"type": "RECORD", "stream": stream, "record": record})
                if reader.stop_requested:
                    raise StopRequested
        finally:
            reader.batch_location = {}

    def _process_activate_version_message(self, message_dict: dict) -> None:
        # Usage is appended and de-duplicated by id; a table version cannot un-bill
        # anything, so the message is noted and skipped.
        stream = message_dict.get("stream")
        known = stream in self.mapper.stream_maps
        self.run_context.skip_message(
            "ACTIVATE_VERSION",
            self.message_reader.line_number,
            "billing is append-only" if known else f"stream {stream!r} has had no SCHEMA",
            warn=not known,
        )

    def _on_idle(self) -> None:
        """Input went quiet: send what is buffered, so usage and STATE do not wait for it."""
        if self.run_context.flush_due():
            self._flush()

    def _flush(self) -> None:
        self.drain_all()  # every buffered payload goes to the delivery pipeline
        self.run_context.flushed()
        self.run_context.delivery.raise_if_failed()
        self.run_context.check_rejection_limits(final=False)

    def process_endofpipe(self) -> None:
        self._phase = "finishing"
        super().process_endofpipe()
        self._complete()

    def _complete(self, deadline: float | None = None, *, check_limits: bool = True) -> None:
        """Checkpoint, wait for delivery (until ``deadline``), summarise, report failures."""
        if self._completed:
            return
        self._completed = True
        run = self.run_context
        all_done = run.delivery.wait(deadline)
        run.delivery.freeze()  # no STATE is written after this point
        for line in run.summary_lines():
            self.logger.info(line)
        run.log_metrics()
        run.close()
        run.delivery.raise_if_failed()
        if not all_done:
            msg = (
                "stopped before everything received was delivered; the last STATE emitted "
                "covers only what the API acknowledged: re-run from it"
            )
            raise InterruptedRun(msg)
        if check_limits:
            run.check_rejection_limits(final=True)

    # --- running and stopping ------------------------------------------------------------

    def run(self, file_input: t.IO[t.Any] | None = None) -> None:
        """Check credentials, read all input, deliver it, checkpoint, summarise."""
        run = self.run_context
        try:
            if not run.settings.dry_run:
                run.destination.check_credentials()
        except StopRequested:
            run.close()
            name = signal.Signals(self._stop_signal or signal.SIGTERM).name
            msg = f"stopped by {name} while checking the credentials, before any input was read"
            raise InterruptedRun(msg) from None
        self._phase = "reading"
        run.start_progress()
        # Decoded records are acyclic and freed by reference counting; the cyclic
        # collector only rescans live objects. Freeze what start-up built and collect
        # young objects less often: about 20% less run time on large inputs.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        try:
            self.listen(file_input)
        except StopRequested:
            self._complete_after_stop(run.delivery.stop_deadline, check_limits=True)
        except InterruptedRun:
            self._complete_after_stop(time.monotonic(), check_limits=False)
            raise
        except (*_INPUT_ERRORS, InputError, RejectionLimitError, StreamMappingError) as exc:
            # Deliver and checkpoint everything received before the bad input, then stop.
            line = self.message_reader.line_number
            stream = self.message_reader.current_stream
            self._complete_after_stop(None, check_limits=False)
            where = f"line {line}" + (f" (stream '{stream}')" if stream else "")
            if isinstance(exc, InputError) and not str(exc).startswith("line "):
                raise InputError(f"{where}: {exc}") from None  # raised where the line is not known
            if isinstance(exc, UsageBillingError):
                raise
            msg = f"{where}: {exc}".replace("\n", " ")
            raise InputError(msg) from None
        except UsageBillingError:
            self._complete_after_stop(time.monotonic(), check_limits=False)
            raise

    def _complete_after_stop(self, deadline: float | None, *, check_limits: bool) -> None:
        if self._completed:  # the end-of-input path already completed, then raised
            return
        run = self.run_context
        try:
            if run.delivery.failure is None:
                run.delivery.stop_deadline = deadline
                self.drain_all(is_endofpipe=True)
        except UsageBillingError as exc:
            self.logger.warning("While stopping: %s", exc)
        self._complete(deadline, check_limits=check_limits)

    def _handle_termination(self, signum: int, frame: t.Any) -> None:
        name = signal.Signals(signum).name
        if not hasattr(self, "run_context"):  # still being set up: nothing to deliver
            sys.exit(InterruptedRun.exit_code)
        now = time.monotonic()
        if self._stop_signal is not None:
            if now - self._stop_signal_at < SIGNAL_DEBOUNCE_SECONDS:
                # Ctrl-C under `meltano run` sends SIGINT, then SIGTERM: one stop request.
                self.logger.warning("Received %s as well: still stopping gracefully", name)
                return
            click.echo(f"{self.name}: second {name}: exiting now without waiting", err=True)
            os._exit(InterruptedRun.exit_code)
        self._stop_signal = signum
        self._stop_signal_at = now
        grace = self.run_context.settings.shutdown_grace_seconds
        self.logger.warning(
            "Received %s: reading stops; delivering what was received (up to %gs)", name, grace
        )
        self.run_context.delivery.stop_deadline = time.monotonic() + grace
        reader = self.message_reader
        reader.stop_requested = True
        if self._phase == "starting" or reader.waiting_for_input:
            raise StopRequested  # out of a blocking read, or of the credential check's retries

    # --- command line --------------------------------------------------------------------

    @classmethod
    def invoke(  # type: ignore[override]
        cls,
        *,
        about: bool = False,
        about_format: str | None = None,
        config: _ConfigInput | None = None,
        file_input: t.IO[str] | None = None,
        dry_run: bool = False,
    ) -> None:
        super(Target, cls).invoke(about=about, about_format=about_format)
        cls.print_version(print_fn=cls.logger.info)
        config = config or _ConfigInput()
        settings = dict(config.config)
        if dry_run:
            settings["dry_run"] = True
        try:
            if config.parse_env:
                _check_environment(cls.config_jsonschema, cls._env_prefix())
            try:
                target = cls(config=settings, validate_config=True, parse_env_config=config.parse_env)
            except (ValueError, TypeError) as exc:  # the SDK parsing TARGET_USAGE_BILLING_* variables
                if not config.parse_env:
                    raise
                raise ConfigError(f"settings from environment variables: {exc}") from None
            target.run(file_input)
        except UsageBillingError as exc:
            _exit_with(exc)
        if target._stop_signal is not None:
            cls.logger.info("Stopped by signal; everything received was delivered")

    @classmethod
    def cb_config(cls, ctx: click.Context, param: click.Option, value: tuple[str, ...]) -> _ConfigInput:
        """--config files, each read as a JSON object; a bad one is one line and exit 2."""
        for path in value:
            if path == "ENV":
                continue
            try:
                content = json.loads(Path(path).read_bytes())
            except FileNotFoundError:
                _exit_with(ConfigError(f"--config {path}: no such file"))
            except OSError as exc:
                _exit_with(ConfigError(f"--config {path}: cannot read it ({exc.strerror})"))
            except ValueError as exc:
                _exit_with(ConfigError(f"--config {path}: not valid JSON ({exc})"))
            if not isinstance(content, dict):
                _exit_with(ConfigError(f"--config {path}: must hold a JSON object of settings"))
        return super().cb_config(ctx, param, value)

    @classmethod
    def _env_prefix(cls) -> str:
        return cls.name.upper().replace("-", "_") + "_"

    @classmethod
    def get_singer_command(cls) -> click.Command:
        command = super().get_singer_command()
        command.params.extend(
            [
                click.Option(
                    ["--dry-run"],
                    is_flag=True,
                    default=False,
                    help="Write the request bodies to dry_run_path instead of sending them.",
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
        )
        return command


def _exit_with(exc: UsageBillingError) -> t.NoReturn:
    """The one line an operator sees (and, at ERROR level, what log collectors see)."""
    logging.getLogger(TargetUsageBilling.name).error("%s", exc)
    click.echo(f"{TargetUsageBilling.name}: error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _check_environment(schema: dict, prefix: str) -> None:
    """TARGET_USAGE_BILLING_* values that cannot become their setting's type: exit 2.

    The SDK would stop on them with a traceback; here the message names the variable
    (and shows the value only when the setting is not secret).
    """
    for name, prop in schema["properties"].items():
        variable = prefix + name.upper().replace("-", "_")
        value = os.environ.get(variable)
        if value is None:
            continue
        types = prop.get("type", [])
        types = [types] if isinstance(types, str) else types
        shown = "(secret value not shown)" if prop.get("secret") else repr(value[:80])
        if "integer" in types:
            try:
                int(value)
            except ValueError:
                raise ConfigError(f"{variable}: expected a whole number, got {shown}") from None
        elif "array" in types or "object" in types:
            kind = "array" if "array" in types else "object"
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise ConfigError(f"{variable}: expected a JSON {kind} ({exc})") from None
            if not isinstance(parsed, list if kind == "array" else dict):
                raise ConfigError(f"{variable}: expected a JSON {kind}, got {type(parsed).__name__}")


def _set_log_level(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        logging.getLogger().setLevel(value.upper())
        logging.getLogger(TargetUsageBilling.name).setLevel(value.upper())


if __name__ == "__main__":
    TargetUsageBilling.cli()
