"""target-usage-billing: the Target class, its settings, and how it starts and stops."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
import typing as t

import click
from singer_sdk.exceptions import (
    InvalidRecord,
    MissingKeyPropertiesError,
    RecordsWithoutSchemaException,
)
from singer_sdk.helpers.capabilities import PluginCapabilities
from singer_sdk.mapper import SameRecordTransform
from singer_sdk.singerlib import SingerMessageType
from singer_sdk.singerlib.exceptions import InvalidInputLine
from singer_sdk.target_base import Target

from target_usage_billing.cli import (
    PLUGIN_NAME,
    RedactSecrets,
    check_config_files,
    extra_options,
    json_logs,
)
from target_usage_billing.commands import run_command
from target_usage_billing.errors import (
    InputError,
    InterruptedRun,
    RejectionLimitError,
    StreamMappingError,
    UsageBillingError,
)
from target_usage_billing.mapping import MappingRejection
from target_usage_billing.reader import LineReader, StopRequested, read_batch_files
from target_usage_billing.report import log_metrics, start_progress, summary_lines
from target_usage_billing.run import BillingRun
from target_usage_billing.runreport import RunReport, run_figures
from target_usage_billing.sdk_overrides import SettingsCheck
from target_usage_billing.settings import DESTINATION_SETTINGS, config_schema
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


class TargetUsageBilling(SettingsCheck, Target):
    """Loads usage records into billing platforms: m3ter, Metronome, Orb, Lago, OpenMeter and Stripe."""

    # (The docstring above is the plugin's description in --about and Meltano.) Messages
    # reach the target through its reader's routes (public seam: message_reader_class and
    # the callbacks the SDK hands it): SCHEMA is checked, then handled by the SDK; RECORD
    # takes a direct path to its sink when no stream map applies; STATE is held back
    # until delivery caught up; BATCH rows take the RECORD path.

    name = PLUGIN_NAME
    config_jsonschema = config_schema()
    destination_settings = frozenset(DESTINATION_SETTINGS)
    default_sink_class = UsageSink
    message_reader_class = LineReader
    message_reader: LineReader  # what the SDK makes of message_reader_class
    capabilities: t.ClassVar[list] = [*Target.capabilities, PluginCapabilities.BATCH]

    def __init__(self, *, reconcile_only: bool = False, **kwargs: t.Any):
        if reconcile_only:  # --reconcile: the SDK's settings handling, no run
            super().__init__(**kwargs)
            return
        self._stop_signal: int | None = None
        self._stop_signal_at = 0.0
        self.report: RunReport | None = None  # set by invoke
        self.check_unused_rules = True  # a replay holds only some streams: it does not
        self._phase = "setup"  # then "checking" (credentials), "reading", "finishing"
        self._completed = False
        # A stop signal during set-up waits until this target's handler is in place: the
        # SDK's, which its __init__ installs, would exit at once with status 0.
        blocked = _block_stop_signals()
        try:
            self._set_up(**kwargs)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def _set_up(self, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        defaults = {name: prop.get("default") for name, prop in self.config_jsonschema["properties"].items()}
        self.billing_run = BillingRun(self.config, defaults)
        # Drains only hand batches to the delivery pipeline, which is where the parallelism is.
        self.max_parallelism = 1
        # streams whose records go straight to their sink (no stream map, no flattening)
        self._direct_sinks: dict[str, UsageSink] = {}
        self._install_redaction()
        reader = self.message_reader
        reader.idle_timeout = self.billing_run.seconds_until_flush
        reader.on_idle = self._on_idle
        reader.on_unknown_message = lambda kind: self.billing_run.skipped_messages.update([kind])
        reader.routes = {
            SingerMessageType.SCHEMA: self._on_schema,
            SingerMessageType.RECORD: self._on_record,
            SingerMessageType.STATE: self._on_state,
            SingerMessageType.BATCH: self._on_batch,
            SingerMessageType.ACTIVATE_VERSION: self._on_activate_version,
        }
        # Replaces the SDK's handlers (installed by its __init__), which exit at once.
        if threading.current_thread() is threading.main_thread():
            for number in _STOP_SIGNALS:
                signal.signal(number, self._on_stop_signal)

    # --- configuration -------------------------------------------------------------------

    def _install_redaction(self) -> None:
        run = self.billing_run

        def secrets() -> list[str]:
            return [*run.secrets, *run.destination.live_secrets()]

        redact = RedactSecrets(secrets)
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(redact)

    # --- message handling ----------------------------------------------------------------

    def _on_schema(self, message_dict: dict) -> None:
        stream = message_dict.get("stream")
        keys = message_dict.get("key_properties")
        if not isinstance(stream, str) or not stream:
            raise InputError("a SCHEMA message needs a stream name")
        if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            msg = f"key_properties must be a list of property names, got {keys!r}"[:300]
            raise InputError(msg)
        if not isinstance(message_dict.get("schema"), dict):
            raise InputError("a SCHEMA message's schema must be a JSON object")
        self.billing_run.check_key_properties(stream, keys or ())
        self.message_reader.sdk_handlers[SingerMessageType.SCHEMA](message_dict)
        self._direct_sinks.pop(stream, None)
        maps = self.mapper.stream_maps.get(stream, [])
        if (
            len(maps) == 1
            and type(maps[0]) is SameRecordTransform
            and not maps[0].flattening_enabled
            and maps[0].stream_alias == stream
        ):
            sink = self.get_sink(stream) if self.sink_exists(stream) else None
            if isinstance(sink, UsageSink) and not sink.include_sdc_metadata_properties:
                self._direct_sinks[stream] = sink

    def _on_record(self, message_dict: dict) -> None:
        run = self.billing_run
        run.records_seen += 1
        stream = message_dict.get("stream")
        sink = self._direct_sinks.get(stream)  # type: ignore[arg-type]
        record = message_dict.get("record")
        if sink is not None and type(record) is dict:  # nearly every record
            sink.process_direct(record)
        elif type(record) is not dict and stream in self.mapper.stream_maps:
            # Not a record at all (null, a list, a number): kept and counted, not mapped.
            got = "null" if record is None else type(record).__name__
            problem = MappingRejection(f"a RECORD's record must be a JSON object, got {got}")
            run.stats.stream(stream).read += 1
            run.reject(stream, record, "input", problem, line=self.message_reader.line_number)
        elif not isinstance(stream, str):
            raise InputError(f"a message's stream must be a string, got {type(stream).__name__}")
        else:  # stream maps, flattening or record metadata: the SDK's full path
            self.message_reader.sdk_handlers[SingerMessageType.RECORD](message_dict)
        # Time is looked at every 64 records (and at every STATE, and when input is
        # quiet): a clock read per record cost more than the check is worth.
        if not run.records_seen & 63 and run.flush_due():
            self._flush()

    def _on_state(self, message_dict: dict) -> None:
        # The SDK's own STATE handling never sees a STATE (its drains then write none):
        # a STATE is released only once delivery caught up with the records before it.
        self.message_reader.assert_line_requires(message_dict, requires={"value"})
        self.billing_run.state_received(message_dict["value"])
        if self.billing_run.flush_due():
            self._flush()

    def _on_batch(self, message_dict: dict) -> None:
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
                self._on_record({"type": "RECORD", "stream": stream, "record": record})
                if reader.stop_requested:
                    raise StopRequested
        finally:
            reader.batch_location = {}

    def _on_activate_version(self, message_dict: dict) -> None:
        # Usage is appended and de-duplicated by id; a table version cannot un-bill
        # anything, so the message is noted and skipped.
        stream = message_dict.get("stream")
        known = stream in self.mapper.stream_maps
        self.billing_run.skip_message(
            "ACTIVATE_VERSION",
            self.message_reader.line_number,
            "billing is append-only" if known else f"stream {stream!r} has had no SCHEMA",
            warn=not known,
        )

    def _on_idle(self) -> None:
        """Input went quiet: send what is buffered, so usage and STATE do not wait for it."""
        if self.billing_run.flush_due():
            self._flush()

    def _flush(self) -> None:
        self.drain_all()  # every buffered payload goes to the delivery pipeline
        self.billing_run.flushed()
        self.billing_run.delivery.raise_if_failed()
        self.billing_run.check_rejection_limits(final=False)

    def flush_and_wait(self) -> None:
        """Hand over every buffered payload and wait until delivery caught up (--replay,
        between stages)."""
        self._flush()
        self.billing_run.delivery.wait()
        self.billing_run.delivery.raise_if_failed()

    def process_endofpipe(self) -> None:
        self._phase = "finishing"
        super().process_endofpipe()
        self._complete(clean=True)

    def _complete(
        self, deadline: float | None = None, *, check_limits: bool = True, clean: bool = False
    ) -> None:
        """Checkpoint, wait for delivery (until ``deadline``), summarise, report failures."""
        if self._completed:
            return
        self._completed = True
        run = self.billing_run
        all_done = run.delivery.wait(deadline)
        # Orb backfills: closed when everything was delivered (their STATEs go now), else reverted
        run.delivery.settle_channels(all_done)
        run.delivery.freeze()  # no STATE is written after this point
        lines = summary_lines(run)
        if json_logs.enabled:  # one event whose figures are fields
            figures = {"destination": run.destination.name, "run_id": run.dead_letters.run_id}
            self.logger.info(
                "\n".join(lines), extra={"event": "summary", "summary": {**figures, **run_figures(run)}}
            )
        else:
            for line in lines:
                self.logger.info(line)
        log_metrics(run)
        run.close(clean=clean and all_done)
        run.delivery.raise_if_failed()
        if run.refused is not None:  # also when it was met while stopping
            raise run.refused
        if not all_done:
            msg = (
                "stopped before everything received was delivered; the last STATE emitted "
                "covers only what the API acknowledged: re-run from it"
            )
            raise InterruptedRun(msg)
        if check_limits:
            run.check_rejection_limits(final=True)
            if self.check_unused_rules:
                run.check_unused_rules()  # a mapping that fired on no stream billed nothing

    # --- running and stopping ------------------------------------------------------------

    def run(self, file_input: t.IO[t.Any] | None = None) -> None:
        """Check credentials, read all input, deliver it, checkpoint, summarise."""
        run = self.billing_run
        try:
            if self._stop_signal is not None:  # received during set-up
                raise StopRequested
            self._phase = "checking"
            if not run.settings.dry_run:
                run.destination.check_credentials()
        except StopRequested:
            run.close()
            name = signal.Signals(self._stop_signal or signal.SIGTERM).name
            doing = "checking the credentials" if self._phase == "checking" else "starting"
            msg = f"stopped by {name} while {doing}, before any input was read"
            raise InterruptedRun(msg) from None
        self._phase = "reading"
        start_progress(run)
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
        run = self.billing_run
        try:
            if run.delivery.failure is None:
                run.delivery.stop_deadline = deadline
                self.drain_all(is_endofpipe=True)
        except UsageBillingError as exc:
            self.logger.warning("While stopping: %s", exc)
        self._complete(deadline, check_limits=check_limits)

    def _on_stop_signal(self, signum: int, frame: t.Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._stop_signal is not None:
            if now - self._stop_signal_at < SIGNAL_DEBOUNCE_SECONDS:
                # Ctrl-C under `meltano run` sends SIGINT, then SIGTERM: one stop request.
                self.logger.warning("Received %s as well: still stopping gracefully", name)
                return
            if json_logs.enabled:
                self.logger.error("second %s: exiting now without waiting", name)
            else:
                click.echo(f"{self.name}: second {name}: exiting now without waiting", err=True)
            if self.report is not None:
                self.report.fields["signal"] = name
                with contextlib.suppress(UsageBillingError):
                    self.report.write(InterruptedRun.exit_code, f"second {name}: exited without waiting")
            os._exit(InterruptedRun.exit_code)
        self._stop_signal = signum
        self._stop_signal_at = now
        grace = self.billing_run.settings.shutdown_grace_seconds
        self.logger.warning(
            "Received %s: reading stops; delivering what was received (up to %gs)", name, grace
        )
        self.billing_run.delivery.stop_deadline = time.monotonic() + grace
        reader = self.message_reader
        reader.stop_requested = True
        if self._phase == "checking" or reader.waiting_for_input:
            raise StopRequested  # out of a blocking read, or of the credential check's retries

    # --- command line --------------------------------------------------------------------

    @classmethod
    def invoke(  # type: ignore[override]
        cls,
        *,
        about: bool = False,
        about_format: str | None = None,
        config: t.Any = None,  # the SDK's --config input: .config (merged files), .parse_env
        file_input: t.IO[str] | None = None,
        dry_run: bool = False,
        reconcile: bool = False,
        since: str | None = None,
        until: str | None = None,
        replay: str | None = None,
        stage: str | None = None,
    ) -> None:
        if about:
            cls.print_about(about_format)
            sys.exit(0)
        run_command(
            cls,
            config=config,
            file_input=file_input,
            dry_run=dry_run,
            reconcile=reconcile,
            since=since,
            until=until,
            replay=replay,
            stage=stage,
        )

    @classmethod
    def cb_config(cls, ctx: click.Context, param: click.Option, value: tuple[str, ...]) -> t.Any:
        """--config files, each read as a JSON object; a bad one is one line and exit 2."""
        check_config_files(value)
        return super().cb_config(ctx, param, value)

    @classmethod
    def _env_prefix(cls) -> str:
        return cls.name.upper().replace("-", "_") + "_"

    @classmethod
    def get_singer_command(cls) -> click.Command:
        command = super().get_singer_command()
        command.params.extend(extra_options())
        return command


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _block_stop_signals() -> bool:
    """Hold SIGTERM/SIGINT back (delivered when unblocked), where the platform can."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    return True


if __name__ == "__main__":
    TargetUsageBilling.cli()
