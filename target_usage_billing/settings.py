"""The target's settings: their JSON Schema (what --about, Meltano and the README show),
their values with defaults applied and checked, and environment variables read safely."""

from __future__ import annotations

import json
import logging
import math
import os
import typing as t
from dataclasses import dataclass

from singer_sdk import typing as th

from target_usage_billing.constants import DEFAULT_RETRY_BUDGET_SECONDS, DEFAULT_TIMEOUT_SECONDS
from target_usage_billing.destinations import DESTINATIONS
from target_usage_billing.errors import ConfigError

logger = logging.getLogger("target-usage-billing")
# A partial batch is sent at the latest this long after the previous hand-over, and never
# sooner because of time alone: a STATE after every record must not shrink requests to
# one record each (state_checkpoint_seconds below this counts as this).
MIN_CHECKPOINT_SECONDS = 1.0
UNMATCHED_STREAMS = ("fail", "skip")
LOG_FORMATS = ("text", "json")
# Each request in flight is a thread with its own connection; more than this only adds
# memory and sockets (the APIs' own rate limits bind long before).
MAX_REQUESTS_IN_FLIGHT = 64

COMMON_SETTINGS = th.PropertiesList(
    th.Property(
        "destination",
        th.StringType,
        required=True,
        allowed_values=list(DESTINATIONS),
        description="Billing platform to load: "
        + ", ".join(list(DESTINATIONS)[:-1])
        + " or "
        + list(DESTINATIONS)[-1]
        + ".",
    ),
    th.Property(
        "mappings",
        th.ArrayType(th.ObjectType(additional_properties=True)),
        required=True,
        description="Rules turning records into payloads: a list of "
        '{"name": NAME?, "stream": NAME_OR_GLOB, "preset": NAME?, "filter": JMESPATH?, '
        '"fields": {FIELD: JMESPATH}}. Every rule whose stream pattern and filter match a record '
        "bills it (one record, several meters), up to the first matching "
        '{"stream": GLOB, "skip": true} rule. With several rules on one stream, give each a name: '
        "it labels the summary, METRIC points and dead letters, and every rule after the "
        "stream's first adds it to its derived ids (see Fan-out in the README).",
    ),
    th.Property(
        "batch_max_bytes",
        th.IntegerType,
        description="Largest request body in bytes; the destination's hard cap always applies "
        "(m3ter: under 512,000).",
    ),
    th.Property(  # the SDK's built-in setting, declared here so its range is documented too
        "batch_size_rows",
        th.IntegerType,
        title="Batch Size Rows",
        description="Maximum number of rows in each batch (each request; the destination's own "
        "limit per request always applies).",
    ),
    th.Property(
        "max_requests_in_flight",
        th.IntegerType,
        default=64,
        description="The most requests sent at once while reading goes on. The level adapts "
        "below it: it starts at 8, grows while every request in flight is busy and answers "
        "stay fast, and shrinks on 429/503, Retry-After, timeouts or slowing answers; batches "
        "in flight never hold more than 128 MB; above 64 is taken as 64.",
    ),
    th.Property(
        "adaptive_requests_in_flight",
        th.BooleanType,
        default=True,
        description="Adapt the requests in flight to the platform's answers (see "
        "max_requests_in_flight); false: always max_requests_in_flight.",
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
        default=DEFAULT_TIMEOUT_SECONDS,
        description="Seconds to wait for an answer before the request counts as failed and is retried.",
    ),
    th.Property(
        "max_retry_seconds",
        th.NumberType,
        default=DEFAULT_RETRY_BUDGET_SECONDS,
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
        "id_ledger_megabytes",
        th.IntegerType,
        default=64,
        description="Memory for the ids sent in this run (two 64-bit hashes an id), which "
        "tell a re-sent event (skipped) from a second event with the same id (dead-lettered "
        "as a conflict). Never exceeded: 64 MB checks the last 1.4 to 2.8 million ids; older "
        "ids leave it.",
    ),
    th.Property(
        "buffer_megabytes",
        th.IntegerType,
        default=64,
        description="Memory for payloads waiting in partial batches, shared by all streams: "
        "past it, the stream whose batch waited longest is sent first.",
    ),
    th.Property(
        "dead_letter_path",
        th.StringType,
        default="target-usage-billing-dead-letters.jsonl",
        description="JSONL file receiving every rejected record with the reason (relative "
        "paths: from the working directory, the project root under Meltano). Append-only and "
        "safe for concurrent runs to share: created by the first rejection, never removed or "
        "truncated; each line names its run_id.",
    ),
    th.Property(
        "journal",
        th.BooleanType,
        default=True,
        description="Keep the run journal: what each platform acknowledged (counts, exact sums "
        "and a sample of ids per customer, meter and UTC hour), written before the STATE that "
        "covers it; --reconcile reads it back. Dry runs keep none.",
    ),
    th.Property(
        "journal_path",
        th.StringType,
        description="SQLite file of the run journal (default: "
        "target-usage-billing-journal.sqlite beside dead_letter_path). Runs may share it.",
    ),
    th.Property(
        "journal_sample_rate",
        th.NumberType,
        default=0.01,
        description="Share of acknowledged ids the journal keeps for --reconcile to look up, "
        "beyond the first of each customer, meter and hour (at most 100 of each): 1 keeps them "
        "all (small volumes), 0 only the first.",
    ),
    th.Property(
        "journal_url",
        th.StringType,
        secret=True,
        description="postgresql://user:password@host/db: keep the journal in PostgreSQL instead "
        "(pipelines on many machines sharing one; needs the postgres extra).",
    ),
    th.Property(
        "unmatched_streams",
        th.StringType,
        default="fail",
        allowed_values=["fail", "skip"],
        description="A stream no mapping rule matches: fail (stop before any of its records "
        "is checkpointed, naming the closest rule) or skip (count its records, send "
        'nothing). A rule {"stream": NAME, "skip": true} skips one stream on purpose. A '
        "mapping that fired on no stream of the run is said at the end the same way (fail: "
        "exit 2; skip: a warning).",
    ),
    th.Property(
        "accept_key_property_changes",
        th.ArrayType(th.StringType),
        description="Streams (names or glob patterns) whose key properties may change: "
        "otherwise a SCHEMA giving a stream with derived ids other key properties stops the "
        "run (exit 2), because its records would get new ids and be billed again. Streams "
        "whose rule maps an explicit id need no entry.",
    ),
    th.Property(
        "allow_resend_beyond_dedup_window",
        th.BooleanType,
        default=False,
        description="Send ids again that the run journal shows the platform acknowledged longer "
        "ago than it de-duplicates them (Stripe: 24 hours, m3ter: 35 days, Metronome: 34 days), "
        "with a warning: the platform bills them a second time. Otherwise ids of the stream's "
        "last batch in the journal are not sent again, and a batch holding other such ids (a "
        "replay) stops the run (exit 2) before it is sent. The journal keeps a sample of ids, "
        "so not every such re-send is seen (see Backfills and history in the README).",
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
        "run_report_path",
        th.StringType,
        description="JSON file written at the end of every run (failed, stopped, --reconcile "
        "and --replay runs too), atomically, for an orchestrator to read: the target's own "
        "exit code and its meaning, the error, per-stream counts, dead letters, the STATE "
        "released (see Run report in the README). Default: none.",
    ),
    th.Property(
        "log_format",
        th.StringType,
        default="text",
        allowed_values=["text", "json"],
        description="text, or json: every log line on stderr one JSON object (the singer-sdk's "
        "structured format) and the end-of-run summary one event with its figures as fields "
        "(also --log-format json).",
    ),
    th.Property(
        "validate_records",
        th.BooleanType,
        default=False,
        description="Validate records against the stream's JSON Schema. Off by default: "
        "mapped payloads are checked field by field anyway.",
    ),
)


DESTINATION_SETTINGS = {prop.name for d in DESTINATIONS.values() for prop in d.settings}


def config_schema() -> dict:
    """The whole settings JSON Schema: common settings, each destination's, their ranges."""
    schema = COMMON_SETTINGS.to_dict()
    for name in RANGES.keys() & schema["properties"].keys():  # the documented range is the one checked
        schema["properties"][name]["description"] += f" Range: {describe_range(name)}."
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


@dataclass(frozen=True)
class Settings:
    """Settings with their defaults applied (the SDK leaves defaults out of config)."""

    destination: str
    dry_run: bool
    dry_run_path: str
    batch_max_bytes: int | None
    batch_size_rows: int | None
    max_requests_in_flight: int
    adaptive_requests_in_flight: bool
    max_requests_per_second: float | None
    request_timeout_seconds: float
    max_retry_seconds: float
    state_checkpoint_seconds: float
    shutdown_grace_seconds: float
    dead_letter_path: str
    journal: bool
    journal_path: str | None
    journal_url: str | None
    journal_sample_rate: float
    id_ledger_megabytes: int
    buffer_megabytes: int
    unmatched_streams: str
    accept_key_property_changes: list[str] | None
    allow_resend_beyond_dedup_window: bool
    max_rejected_records: int | None
    max_rejected_ratio: float | None
    progress_interval_seconds: float
    run_report_path: str | None
    log_format: str
    load_method: str | None

    @classmethod
    def from_config(cls, config: t.Mapping[str, t.Any], defaults: t.Mapping[str, t.Any]) -> Settings:
        """The settings of ``config`` (``defaults`` where unset or empty), converted and
        checked: ConfigError names the first setting that is wrong."""

        def get(name: str) -> t.Any:
            value = config.get(name)
            return defaults.get(name) if value is None or value == "" else value

        problems = non_finite_numbers(config, config_schema())
        if problems:
            raise ConfigError(problems[0])
        values = {name: get(name) for name in cls.__dataclass_fields__}
        # JSON config files arrive with Decimal numbers (the SDK reads them exactly):
        # time and ratio settings are plain floats from here on.
        for name, kind in _NUMBER_SETTINGS.items():
            if values[name] is not None:
                try:
                    values[name] = kind(values[name])
                except (TypeError, ValueError, OverflowError):  # NaN or infinity as an integer
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
        """ConfigError for a missing destination, a setting outside its documented range, a
        load_method other than append-only or an unknown unmatched_streams."""
        if not self.destination:
            known = ", ".join(DESTINATIONS)
            raise ConfigError(f"destination: required, one of {known}")
        for name, (low, high, low_included) in RANGES.items():
            value = getattr(self, name)
            if value is not None and not _within(value, low, high, low_included):
                raise ConfigError(f"{name}: must be {describe_range(name)}, got {value}")
        if self.load_method not in (None, "append-only"):
            msg = (
                f"load_method: {self.load_method!r} is not possible with a billing API; usage is "
                "appended, and re-sent items are de-duplicated by their ids (use append-only)"
            )
            raise ConfigError(msg)
        if self.unmatched_streams not in UNMATCHED_STREAMS:
            allowed = ", ".join(UNMATCHED_STREAMS)
            msg = f"unmatched_streams: must be one of {allowed}, got {self.unmatched_streams!r}"
            raise ConfigError(msg)
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format: must be text or json, got {self.log_format!r}")


# Each numeric setting's range: (lowest, highest, whether the lowest is allowed). Every
# value must be finite: the time settings feed clocks and waits that cannot take NaN,
# infinity or a trillion seconds.
DAY = 86_400
RANGES: dict[str, tuple[float, float, bool]] = {
    "batch_max_bytes": (1024, 1 << 31, True),
    "batch_size_rows": (1, 1_000_000, True),
    "max_requests_in_flight": (1, 1_000_000, True),
    "max_requests_per_second": (0, 1_000_000, True),
    "request_timeout_seconds": (0, DAY, False),
    "max_retry_seconds": (0, 7 * DAY, True),
    "state_checkpoint_seconds": (0, DAY, True),
    "shutdown_grace_seconds": (0, DAY, True),
    "max_rejected_records": (0, 1 << 62, True),
    "max_rejected_ratio": (0, 1, True),
    "progress_interval_seconds": (0, DAY, True),
    "id_ledger_megabytes": (1, 65_536, True),
    "buffer_megabytes": (1, 65_536, True),
    "journal_sample_rate": (0, 1, True),
}


def describe_range(name: str) -> str:
    """A numeric setting's range as the documentation says it."""
    low, high, low_included = RANGES[name]
    lowest = f"{low:,}" if low_included else f"more than {low:,}"
    return f"a finite number from {lowest} to {high:,}"


def _within(value: float, low: float, high: float, low_included: bool) -> bool:
    if not math.isfinite(value):
        return False
    return (low <= value if low_included else low < value) and value <= high


def non_finite_numbers(config: t.Mapping[str, t.Any], schema: dict) -> list[str]:
    """Numeric settings (any destination's too) given NaN or an infinity, as problems."""
    problems = []
    for name, prop in schema["properties"].items():
        types = prop.get("type", [])
        value = config.get(name)
        if value is None or isinstance(value, (bool, str)) or not {"number", "integer"} & set(types):
            continue
        try:
            finite = math.isfinite(value)
        except (TypeError, ValueError, OverflowError):
            continue  # not a number at all: the type check says so
        if not finite:
            problems.append(f"{name}: must be a finite number, got {value}")
    return problems


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
    "journal_sample_rate": float,
    "id_ledger_megabytes": int,
    "buffer_megabytes": int,
}


def check_environment(schema: dict, prefix: str) -> None:
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
