"""One run of the target: the objects it wires together and the rules for stopping.

Owns the destination, the compiled rules, the delivery pipeline, the dead letters and
the statistics; decides when a STATE is checkpointed and when rejections are too many;
prints the summary. The Target class feeds it from the SDK's message callbacks.
"""

from __future__ import annotations

import collections
import difflib
import json
import logging
import sys
import threading
import time
import typing as t
from dataclasses import dataclass

import msgspec
from singer_sdk.metrics import get_metrics_logger

from target_usage_billing.deadletter import DeadLetters
from target_usage_billing.delivery import Delivery, DryRunWriter
from target_usage_billing.destinations import DESTINATIONS, Destination
from target_usage_billing.errors import ConfigError, RejectionLimitError, UnmatchedStreamError
from target_usage_billing.http import HttpTransport, RateLimiter
from target_usage_billing.ledger import IdLedger
from target_usage_billing.mapping import CompiledRule, MappingRejection, compile_rules, find_rule
from target_usage_billing.stats import RunStats

logger = logging.getLogger("target-usage-billing")
# The ratio limit is judged only once this many records reached a rule, so that two bad
# records among the first ten do not stop a run of millions.
MIN_RECORDS_FOR_RATIO = 1000
# A partial batch is sent at the latest this long after the previous hand-over, and never
# sooner because of time alone: a STATE after every record must not shrink requests to
# one record each (state_checkpoint_seconds below this counts as this).
MIN_CHECKPOINT_SECONDS = 1.0
UNMATCHED_STREAMS = ("fail", "skip")
# Each request in flight is a thread with its own connection; more than this only adds
# memory and sockets (the APIs' own rate limits bind long before).
MAX_REQUESTS_IN_FLIGHT = 64
# STATE values go out exactly as the tap wrote them: Decimal keeps a fraction's digits,
# integers of any size stay integers.
_state_encoder = msgspec.json.Encoder(decimal_format="number")


@dataclass(frozen=True)
class Settings:
    """Settings with their defaults applied (the SDK leaves defaults out of config)."""

    destination: str
    dry_run: bool
    dry_run_path: str
    batch_max_bytes: int | None
    batch_size_rows: int | None
    max_requests_in_flight: int
    max_requests_per_second: float | None
    request_timeout_seconds: float
    max_retry_seconds: float
    state_checkpoint_seconds: float
    shutdown_grace_seconds: float
    dead_letter_path: str
    unmatched_streams: str
    max_rejected_records: int | None
    max_rejected_ratio: float | None
    progress_interval_seconds: float
    load_method: str | None

    @classmethod
    def from_config(cls, config: t.Mapping[str, t.Any], defaults: t.Mapping[str, t.Any]) -> Settings:
        def get(name: str) -> t.Any:
            value = config.get(name)
            return defaults.get(name) if value is None or value == "" else value

        values = {name: get(name) for name in cls.__dataclass_fields__}
        # JSON config files arrive with Decimal numbers (the SDK reads them exactly):
        # time and ratio settings are plain floats from here on.
        for name, kind in _NUMBER_SETTINGS.items():
            if values[name] is not None:
                try:
                    values[name] = kind(values[name])
                except (TypeError, ValueError):
                    raise ConfigError(f"{name}: expected a number, got {values[name]!r}") from None
        in_flight = values["max_requests_in_flight"]
        if isinstance(in_flight, int) and in_flight > MAX_REQUESTS_IN_FLIGHT:
            logger.warning(
                "max_requests_in_flight=%d is more than this target starts (one thread and "
                "connection each): using %d",
                in_flight,
                MAX_REQUESTS_IN_FLIGHT,
            )
            values["max_requests_in_flight"] = MAX_REQUESTS_IN_FLIGHT
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if not self.destination:
            known = ", ".join(DESTINATIONS)
            raise ConfigError(f"destination: required, one of {known}")
        positive = {
            "max_requests_in_flight": self.max_requests_in_flight,
            "request_timeout_seconds": self.request_timeout_seconds,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name}: must be greater than 0, got {value}")
        non_negative = {
            "max_retry_seconds": self.max_retry_seconds,
            "state_checkpoint_seconds": self.state_checkpoint_seconds,
            "shutdown_grace_seconds": self.shutdown_grace_seconds,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{name}: must be 0 or more, got {value}")
        if self.max_rejected_records is not None and self.max_rejected_records < 0:
            raise ConfigError(f"max_rejected_records: must be 0 or more, got {self.max_rejected_records}")
        if self.max_requests_per_second is not None and self.max_requests_per_second < 0:
            msg = f"max_requests_per_second: must be 0 (no limit) or more, got {self.max_requests_per_second}"
            raise ConfigError(msg)
        if self.batch_size_rows is not None and self.batch_size_rows < 1:
            raise ConfigError(f"batch_size_rows: must be at least 1, got {self.batch_size_rows}")
        if self.batch_max_bytes is not None and self.batch_max_bytes < 1024:
            raise ConfigError(f"batch_max_bytes: must be at least 1024, got {self.batch_max_bytes}")
        if self.load_method not in (None, "append-only"):
            msg = (
                f"load_method: {self.load_method!r} is not possible with a billing API; usage is "
                "appended, and re-sent items are de-duplicated by their ids (use append-only)"
            )
            raise ConfigError(msg)
        if self.max_rejected_ratio is not None and not 0 <= self.max_rejected_ratio <= 1:
            raise ConfigError(f"max_rejected_ratio: must be between 0 and 1, got {self.max_rejected_ratio}")
        if self.unmatched_streams not in UNMATCHED_STREAMS:
            allowed = ", ".join(UNMATCHED_STREAMS)
            msg = f"unmatched_streams: must be one of {allowed}, got {self.unmatched_streams!r}"
            raise ConfigError(msg)


_NUMBER_SETTINGS: dict[str, type] = {
    "batch_max_bytes": int,
    "batch_size_rows": int,
    "max_requests_in_flight": int,
    "max_requests_per_second": float,
    "request_timeout_seconds": float,
    "max_retry_seconds": float,
    "state_checkpoint_seconds": float,
    "shutdown_grace_seconds": float,
    "max_rejected_records": int,
    "max_rejected_ratio": float,
    "progress_interval_seconds": float,
}


class BillingRun:
    def __init__(self, config: t.Mapping[str, t.Any], defaults: t.Mapping[str, t.Any]):
        self.settings = settings = Settings.from_config(config, defaults)
        destination_class = DESTINATIONS[settings.destination]
        problems = destination_class.config_errors(config, dry_run=settings.dry_run)
        if problems:
            raise ConfigError("; ".join(problems))
        specs = destination_class.field_specs(config)
        self.rules: list[CompiledRule] = compile_rules(
            config.get("mappings"), specs, destination_class.presets, destination_class.name
        )
        self.secrets = destination_class.secrets(config)
        self.transport = HttpTransport(
            timeout_seconds=settings.request_timeout_seconds,
            retry_budget_seconds=settings.max_retry_seconds,
        )
        self.destination: Destination = destination_class(config, self.transport)
        self.max_items_per_request = min(
            settings.batch_size_rows or destination_class.max_items_per_request,
            destination_class.max_items_per_request,
        )
        self.max_body_bytes = min(
            settings.batch_max_bytes or destination_class.max_body_bytes,
            destination_class.max_body_bytes,
        )
        if settings.max_requests_per_second is None:
            windows = destination_class.rate_limits
        elif settings.max_requests_per_second > 0:
            # n requests per n/rate seconds: exactly the rate asked, also below 1 per second
            rate = settings.max_requests_per_second
            burst = max(1, int(rate))
            windows = ((burst, burst / rate),)
        else:
            windows = ()  # 0: no client-side limit
        self.limiter = RateLimiter(windows)
        self.stats = RunStats()
        self.key_properties: dict[str, tuple[str, ...]] = {}  # per stream, set by its sink
        self.first_payloads: dict[str, t.Any] = {}  # dry run: the first payload of each stream
        self.dead_letters = _open_output(
            "dead_letter_path", DeadLetters, settings.dead_letter_path, self.secrets
        )
        self.dry_run = (
            _open_output("dry_run_path", DryRunWriter, settings.dry_run_path) if settings.dry_run else None
        )
        self.ledger = IdLedger()
        self.delivery = Delivery(
            self.destination,
            self.transport,
            self.limiter,
            self.dead_letters,
            self.stats,
            max_in_flight=settings.max_requests_in_flight,
            on_states=self._emit_states,
            on_api_rejection=lambda: self.check_rejection_limits(final=False),
            key_properties=self.key_properties,
            dry_run=self.dry_run,
        )
        self._rule_cache: dict[str, CompiledRule | None] = {}
        self._rules_used: set[int] = set()
        self.records_seen = 0  # records read so far; a record's index is its position
        self.checkpoint_seconds = max(settings.state_checkpoint_seconds, MIN_CHECKPOINT_SECONDS)
        self._next_flush = time.monotonic() + self.checkpoint_seconds
        self._last_emitted: bytes | None = None
        self._stdout_lock = threading.Lock()
        self.states_emitted = 0
        self.states_withheld = 0  # dry run: STATEs that would have been emitted
        self.skipped_messages: collections.Counter[str] = collections.Counter()
        self._progress: threading.Thread | None = None
        self._finished = threading.Event()

    # --- rules -------------------------------------------------------------------------

    def rule_for(self, stream: str) -> CompiledRule | None:
        """The rule for ``stream``; a stream no rule matches stops the run unless allowed.

        Called when the stream's SCHEMA arrives, before any of its records is read, so
        no STATE can ever cover records of a stream that was silently left out.
        """
        if stream in self._rule_cache:
            return self._rule_cache[stream]
        rule = find_rule(self.rules, stream)
        self._rule_cache[stream] = rule
        if rule is not None:
            self._rules_used.add(rule.index)
            if rule.skip:
                logger.info(
                    "Stream '%s': %s says skip: its records are counted, not sent", stream, rule.where
                )
            return rule
        patterns = [r.stream_pattern for r in self.rules]
        closest = difflib.get_close_matches(stream, patterns, n=1, cutoff=0.5)
        hint = f"; closest: {closest[0]!r}" if closest else ""
        listed = ", ".join(repr(p) for p in patterns)
        if self.settings.unmatched_streams == "skip":
            logger.warning(
                "Stream '%s' matches no mapping rule (patterns: %s%s): its records are skipped "
                "(unmatched_streams is skip)",
                stream,
                listed,
                hint,
            )
            return None
        msg = (
            f"stream {stream!r} matches no mapping rule (patterns: {listed}{hint}), so its usage "
            "would not be billed; fix the rule's stream, add a rule "
            f'{{"stream": "{stream}", "skip": true}} if it carries no usage, or set '
            "unmatched_streams to skip"
        )
        raise UnmatchedStreamError(msg)

    def skip_message(self, kind: str, line: int, why: str, *, warn: bool = True) -> None:
        """A message that carries no usage, skipped: counted in the summary."""
        self.skipped_messages[kind] += 1
        if self.skipped_messages[kind] == 1 or warn:
            log = logger.warning if warn else logger.info
            log("line %d: skipping %s message (%s)", line, kind, why)

    def unused_rules(self) -> list[CompiledRule]:
        return [rule for rule in self.rules if rule.index not in self._rules_used]

    # --- rejections --------------------------------------------------------------------

    def reject(
        self,
        stream: str,
        record: t.Any,
        stage: str,
        rejection: MappingRejection,
        *,
        line: int | None,
        payload: t.Any = None,
        **details: t.Any,
    ) -> None:
        self.dead_letters.write(
            stream=stream,
            record=record,
            stage=stage,
            reason=str(rejection),
            line=line,
            field=rejection.field,
            expression=rejection.expression,
            payload=payload,
            **details,
        )
        self.stats.add_rejected(stream, stage, str(rejection))
        self.check_rejection_limits(final=False)

    def check_rejection_limits(self, *, final: bool) -> None:
        settings = self.settings
        rejected = self.stats.total("rejected")
        if settings.max_rejected_records is not None and rejected > settings.max_rejected_records:
            msg = (
                f"{rejected} records rejected, over max_rejected_records={settings.max_rejected_records}"
                f"{self._dead_letter_hint()}"
            )
            raise RejectionLimitError(msg)
        if settings.max_rejected_ratio is None or not rejected:
            return
        # Records refused by the API were counted as mapped when they were batched.
        considered = self.stats.total("mapped") + rejected - self.stats.total("rejected_by_api")
        if considered and (final or considered >= MIN_RECORDS_FOR_RATIO):
            ratio = rejected / considered
            if ratio > settings.max_rejected_ratio:
                msg = (
                    f"{rejected} of {considered} mappable records rejected ({ratio:.1%}), over "
                    f"max_rejected_ratio={settings.max_rejected_ratio:g}{self._dead_letter_hint()}"
                )
                raise RejectionLimitError(msg)

    def _dead_letter_hint(self) -> str:
        return f"; see {self.dead_letters.path}"

    # --- STATE -------------------------------------------------------------------------

    def state_received(self, state: t.Any) -> None:
        """A STATE after ``records_seen`` records: released once they are all done."""
        if state:  # an empty STATE is never emitted
            self.delivery.add_state(state, self.records_seen)

    def flush_due(self) -> bool:
        """Whether buffered records should be handed over so that pending STATEs can go.

        Full batches go at once; this bounds how long a partial batch (and so the STATE
        after it, and the usage in it) waits: at most ``state_checkpoint_seconds``.
        """
        return time.monotonic() >= self._next_flush and (
            self.delivery.has_pending_states or self.delivery.has_buffered
        )

    def seconds_until_flush(self) -> float | None:
        """How long input may stay idle before buffered usage must go; None: nothing waits.

        Only buffered usage needs the reading thread: a STATE waiting on requests in
        flight is released by the delivery workers when they are acknowledged.
        """
        if not self.delivery.has_buffered:
            return None
        return max(0.0, self._next_flush - time.monotonic())

    def flushed(self) -> None:
        self._next_flush = time.monotonic() + self.checkpoint_seconds

    def _emit_states(self, states: list[t.Any]) -> None:
        if self.dry_run is not None:
            # Nothing was billed: a STATE would move the tap's bookmark past usage that
            # the next real run then never sees.
            self.states_withheld += len(states)
            return
        # Dead letters first: a STATE must never cover a rejection that is not on disk.
        self.dead_letters.sync()
        lines = []
        for state in states:
            line = _state_encoder.encode(state)  # the value alone, as Singer targets write it
            if line != self._last_emitted:
                lines.append(line)
                self._last_emitted = line
        if not lines:
            return
        with self._stdout_lock:
            out = sys.stdout.buffer
            out.write(b"".join(line + b"\n" for line in lines))
            out.flush()
            self.states_emitted += len(lines)
        logger.debug("Emitted STATE %s", lines[-1].decode())

    # --- progress and summary ----------------------------------------------------------

    def start_progress(self) -> None:
        interval = self.settings.progress_interval_seconds
        if interval <= 0 or self._progress is not None:
            return

        def report() -> None:
            while not self._finished.wait(interval):
                logger.info(self.progress_line())

        self._progress = threading.Thread(target=report, name="progress", daemon=True)
        self._progress.start()

    def progress_line(self) -> str:
        stats = self.stats
        read = stats.total("read")
        rate = read / stats.elapsed if stats.elapsed > 0 else 0.0
        return (
            f"progress: read {read}, mapped {stats.total('mapped')}, sent {stats.total('sent')}, "
            f"rejected {stats.total('rejected')}, requests {stats.total('requests')}, "
            f"retries {stats.total('retries')}, {rate:,.0f} records/s, in flight {self.delivery.in_flight}"
        )

    def summary_lines(self) -> list[str]:
        stats, transport = self.stats, self.transport.stats
        throttled = (
            f", waited {transport.throttled_seconds:.1f}s for the rate limit"
            if transport.throttled_seconds >= 0.1
            else ""
        )
        noun = self.destination.item_noun
        dry = self.dry_run is not None
        sent = "would send" if dry else "sent"
        mode = " (dry run: nothing was sent, no STATE was written)" if dry else ""
        lines = [f"Summary for {self.destination.label}{mode}, {stats.elapsed:.1f}s:"]
        for name, s in sorted(stats.streams.items()):
            duplicates = f", duplicates {s.duplicates}" if s.duplicates else ""
            lines.append(
                f"  stream {name}: read {s.read}, filtered {s.filtered}, unmapped {s.unmapped}, "
                f"{sent} {s.sent} {noun}, rejected {s.rejected}{duplicates}, requests {s.requests}, "
                f"retries {s.retries}"
            )
            for reason, count in s.reasons.most_common(3):
                lines.append(f"    rejected {count} x {reason}")
            if dry and name in self._rule_cache:
                rule = self._rule_cache[name]
                lines.append(
                    f"    rule: {rule.where if rule is not None else 'none (unmatched_streams is skip)'}"
                )
                if name in self.first_payloads:
                    shown = _state_encoder.encode(self.first_payloads[name]).decode()
                    lines.append(f"    first payload: {shown[:1000]}{'...' if len(shown) > 1000 else ''}")
        states = (
            f"STATE messages withheld {self.states_withheld}"
            if dry
            else f"STATE messages emitted {self.states_emitted}"
        )
        duplicates = stats.total("duplicates")
        lines.append(
            f"  total: {sent} {stats.total('sent')} {noun} in {stats.total('requests')} requests, "
            f"{stats.total('retries')} retries, rejected {stats.total('rejected')}, "
            + (f"duplicates skipped {duplicates}, " if duplicates else "")
            + f"{states}{throttled}"
        )
        if transport.statuses:
            answers = ", ".join(f"{status} x {n}" for status, n in sorted(transport.statuses.items()))
            lines.append(f"  HTTP answers (authentication included): {answers}")
        if self.dead_letters.count:
            lines.append(f"  dead letters: {self.dead_letters.count} in {self.dead_letters.path}")
        if self.skipped_messages:
            skipped = ", ".join(f"{kind} x {n}" for kind, n in sorted(self.skipped_messages.items()))
            lines.append(f"  messages skipped: {skipped}")
        for rule in self.unused_rules():
            lines.append(f"  {rule.where} matched no stream")
        if dry:
            lines.append(f"  request bodies written to {self.settings.dry_run_path}")
        return lines

    def metric_points(self) -> list[dict]:
        """The summary as singer-sdk METRIC points, one set per stream."""
        points = []
        elapsed = round(self.stats.elapsed, 3)
        for name, s in sorted(self.stats.streams.items()):
            tags = {"stream": name, "destination": self.destination.name}
            for metric, value in (
                ("usage_billing.read", s.read),
                ("usage_billing.filtered", s.filtered),
                ("usage_billing.unmapped", s.unmapped),
                ("usage_billing.sent", s.sent),
                ("usage_billing.duplicates", s.duplicates),
                ("usage_billing.rejected", s.rejected),
                ("usage_billing.requests", s.requests),
                ("usage_billing.retries", s.retries),
            ):
                points.append({"type": "counter", "metric": metric, "value": value, "tags": tags})
            points.append(
                {"type": "timer", "metric": "usage_billing.run_duration", "value": elapsed, "tags": tags}
            )
        return points

    def log_metrics(self) -> None:
        metrics_logger = get_metrics_logger()
        for point in self.metric_points():
            metrics_logger.info("METRIC: %s", json.dumps(point, separators=(",", ":")))

    def close(self) -> None:
        self._finished.set()
        self.delivery.close()
        self.transport.close_connections()  # the reading thread's (credential check)
        self.dead_letters.close()
        if self.dry_run is not None:
            self.dry_run.close()


_Output = t.TypeVar("_Output")


def _open_output(setting: str, kind: t.Callable[..., _Output], path: str, *args: t.Any) -> _Output:
    """Open an output file at start-up: an unwritable path is a settings error, not a crash."""
    try:
        return kind(path, *args)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{setting}: cannot write {path!r}: {reason}") from None
