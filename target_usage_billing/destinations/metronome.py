"""Metronome: usage events to POST {api_url}/v1/ingest.

Contract (see billing-apis.md): static Bearer token (bad token: 403); body a bare JSON
array of 1..100 events; gzip accepted; one invalid event fails the whole request with
400; timestamps at most 34 days old and 24 h ahead; ``transaction_id`` de-duplicates.
"""

from __future__ import annotations

import datetime as dt
import gzip
import typing as t

from singer_sdk import typing as th

from target_usage_billing.destinations.base import (
    Acknowledgement,
    BearerKeyDestination,
    OutgoingRequest,
    OutsideWindow,
    TimeWindow,
)
from target_usage_billing.destinations.readback import ItemCheck, Window, read_json
from target_usage_billing.journal import JournalFields
from target_usage_billing.mapping import FieldKind, FieldSpec, Preset

# Metronome's windows: usage at most 34 days old and 24 hours ahead; transaction_id
# de-duplicated for 34 days after Metronome received it
MAX_AGE = dt.timedelta(days=34)
MAX_AHEAD = dt.timedelta(hours=24)
DEDUP_WINDOW = dt.timedelta(days=34)
# Compressing tiny bodies costs more than it saves on the wire.
GZIP_MIN_BYTES = 1024
# metronome_max_property_bytes at most: a value longer than this is no property a request carries
MAX_PROPERTY_BYTES_LIMIT = 1_048_576


class MetronomeDestination(BearerKeyDestination):
    name = "metronome"
    label = "Metronome"
    item_noun = "events"
    ingest_path = "/v1/ingest"
    max_items_per_request = 100
    max_body_bytes = 4_000_000  # no published cap; keep requests reasonable
    rate_limits = ()  # none published: 429 + Retry-After is honoured instead
    key_setting = "metronome_api_token"
    url_setting = "metronome_api_url"
    # v1.usage.ingest casts the answer to None: a 200, with no body or a JSON one
    acknowledgement = Acknowledgement((200,), "empty or object")
    journal_fields = JournalFields(
        "transaction_id", ("customer_id",), "event_type", "timestamp", (("properties", None),)
    )
    default_url = "https://api.metronome.com"
    dedup_window = DEDUP_WINDOW
    max_age = MAX_AGE
    probe_path = "/v1/customers?limit=1"
    credential = "API token"
    presets: t.ClassVar[dict[str, Preset]] = {
        "segment": Preset(
            description="Segment track calls, as Segment's own Metronome destination maps them.",
            filter="type == 'track'",
            fields={
                "transaction_id": "messageId",
                "customer_id": "context.groupId",
                "timestamp": "timestamp",
                "event_type": "event",
                "properties": "properties",
            },
        ),
    }
    required_settings = ("metronome_api_token",)
    settings: t.ClassVar[list[th.Property]] = [
        th.Property("metronome_api_token", th.StringType, secret=True, description="Metronome API token."),
        th.Property(
            "metronome_api_url",
            th.StringType,
            default="https://api.metronome.com",
            description="Base URL of Metronome's API.",
        ),
        th.Property(
            "metronome_numbers_as_strings",
            th.BooleanType,
            default=True,
            description="Send numeric property values as strings (exact decimal text), as "
            "Metronome recommends for precision. false sends JSON numbers.",
        ),
        th.Property(
            "metronome_max_property_bytes",
            th.IntegerType,
            default=256,
            description="Longest property value (UTF-8 bytes) an event may carry; a longer one is "
            "dead-lettered, not sent (users report Metronome dropping such events; the limit is not "
            f"in its docs). 0: no check. Range: 0 to {MAX_PROPERTY_BYTES_LIMIT:,}.",
        ),
        th.Property(
            "metronome_gzip",
            th.BooleanType,
            default=True,
            description="Compress request bodies with gzip when that makes them smaller.",
        ),
    ]

    def __init__(self, config: t.Mapping[str, t.Any], transport: t.Any):
        super().__init__(config, transport)
        self.gzip = bool(config.get("metronome_gzip", True))
        self._window = TimeWindow(MAX_AGE, MAX_AHEAD)
        self.max_property_bytes = int(config.get("metronome_max_property_bytes", 256) or 0)

    @classmethod
    def config_errors(cls, config: t.Mapping[str, t.Any], *, dry_run: bool) -> list[str]:
        problems = super().config_errors(config, dry_run=dry_run)
        limit = config.get("metronome_max_property_bytes")
        if limit is not None and not 0 <= limit <= MAX_PROPERTY_BYTES_LIMIT:  # an int: the schema says so
            most = f"{MAX_PROPERTY_BYTES_LIMIT:,}"
            problems.append(f"metronome_max_property_bytes: must be 0 (no check) to {most}, got {limit}")
        return problems

    @classmethod
    def field_specs(cls, config: t.Mapping[str, t.Any]) -> list[FieldSpec]:
        as_strings = bool(config.get("metronome_numbers_as_strings", True))
        return [
            FieldSpec("transaction_id", FieldKind.ID),
            FieldSpec("customer_id", FieldKind.STRING, required=True),
            FieldSpec("event_type", FieldKind.STRING, required=True),
            FieldSpec("timestamp", FieldKind.TIMESTAMP, required=True),
            FieldSpec("properties", FieldKind.OBJECT, numbers_as_strings=as_strings),
        ]

    def validate_payload(self, payload: dict[str, t.Any]) -> str | None:
        # One event outside the window fails Metronome's whole request: refuse it here.
        where = self._window.outside(payload["timestamp"])
        if where == "past":
            return OutsideWindow(
                f"timestamp is more than {MAX_AGE.days} days in the past (Metronome refuses usage older "
                f"than its window), got {payload['timestamp']}"
            )
        if where == "future":
            return (
                f"timestamp {payload['timestamp']} is more than 24 hours in the future (Metronome refuses it)"
            )
        limit = self.max_property_bytes
        if limit:
            for key, value in (payload.get("properties") or {}).items():
                # a character is at most 4 bytes: only long text is measured
                if type(value) is str and len(value) * 4 > limit and len(value.encode()) > limit:
                    return (
                        f"properties.{key}: value of {len(value.encode())} bytes, over "
                        f"metronome_max_property_bytes={limit}"
                    )
        return None

    # --- read side: POST /v1/events/search, at most 100 transaction ids ----------------

    read_days = 34  # the search covers Metronome's last 34 days

    def check_items(self, ids: list[str], window: Window) -> dict[str, ItemCheck]:
        found = read_json(
            self,
            "POST",
            f"{self.api_url}/v1/events/search",
            self._headers(),
            {"transactionIds": ids},
            setting=self.key_setting,
        )
        checks = {}
        for event in found if isinstance(found, list) else []:
            problem = None
            if event.get("is_duplicate"):
                problem = "Metronome marks it a duplicate"
            elif not event.get("matched_customer"):
                problem = f"no Metronome customer matches customer_id {event.get('customer_id')!r}"
            elif not event.get("matched_billable_metrics"):
                problem = f"no billable metric matches event_type {event.get('event_type')!r}"
            checks[str(event.get("transaction_id"))] = ItemCheck(True, problem)
        return checks

    def ingest_request(self, body: bytes) -> OutgoingRequest:
        headers = self._headers()
        if self.gzip and len(body) >= GZIP_MIN_BYTES:
            # Level 1: JSON still shrinks ~5x, at half the CPU of the default level.
            # mtime=0: the same events always compress to the same bytes.
            packed = gzip.compress(body, compresslevel=1, mtime=0)
            if len(packed) < len(body):
                headers["Content-Encoding"] = "gzip"
                body = packed
        return OutgoingRequest("POST", f"{self.api_url}{self.ingest_path}", headers, body)
