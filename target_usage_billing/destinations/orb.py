"""Orb: usage events to POST {api_url}/v1/ingest.

Contract (confirmed against orb-billing 4.90.0's ``EventIngestParams`` and the
``events.ingest`` documentation it carries): Bearer API key; body
``{"events": [...]}``; each event ``{idempotency_key, event_name, timestamp, properties,
customer_id | external_customer_id}`` with exactly one of the two customer ids,
``properties`` required and flat (numbers, booleans, strings), ``timestamp`` ISO 8601 in
UTC, at most 5 minutes ahead and no older than the account's ingestion grace period
(12 hours unless agreed with Orb). Older usage goes through Orb's backfill flow
(``orb_backfill``, confirmed against ``events.backfills`` and its types): a backfill per
customer and timeframe of at most 31 days (``POST /v1/events/backfills``), its events
ingested with ``?backfill_id=``, closed at the end of a run that delivered everything
(``.../close``) and reverted (``.../revert``) when the run fails. ``idempotency_key``
de-duplicates: an event is ingested at most once. A 4xx answer lists ``validation_failed: [{idempotency_key,
validation_errors}]`` and ingests nothing of the request; 5xx: resend it all. Orb
publishes no request-size limit; its own integrations send 500 events per request.
"""

from __future__ import annotations

import datetime as dt
import json
import typing as t
import urllib.parse
from collections.abc import Sequence

from singer_sdk import typing as th

from target_usage_billing.destinations.base import (
    Acknowledgement,
    BearerKeyDestination,
    OutgoingRequest,
    OutsideWindow,
    Ruling,
    TimeWindow,
    Verdict,
    json_document,
)
from target_usage_billing.destinations.orb_backfills import BACKFILL_DAYS, Backfills
from target_usage_billing.destinations.readback import ItemCheck, Window, iso, read_json
from target_usage_billing.journal import JournalFields
from target_usage_billing.journal_tally import hour_of
from target_usage_billing.mapping import FieldKind, FieldSpec, Preset

MAX_AHEAD = dt.timedelta(minutes=5)
DEFAULT_GRACE_HOURS = 12.0
MAX_GRACE_HOURS = 10 * 8760  # ten years: far beyond any grace period, within what a timedelta holds


class OrbDestination(BearerKeyDestination):
    name = "orb"
    label = "Orb"
    item_noun = "events"
    envelope_key = "events"
    ingest_path = "/v1/ingest"
    max_items_per_request = 500
    max_body_bytes = 4_000_000  # none published: keep requests reasonable
    rate_limits = ()  # none published: 429 + Retry-After is honoured instead
    key_setting = "orb_api_key"
    url_setting = "orb_api_url"
    # EventIngestResponse: validation_failed is always present (judge_acknowledgement)
    acknowledgement = Acknowledgement((200,), "object")
    journal_fields = JournalFields(
        "idempotency_key",
        ("customer_id", "external_customer_id"),
        "event_name",
        "timestamp",
        (("properties", None),),
    )
    default_url = "https://api.withorb.com"
    probe_path = "/v1/customers?limit=1"
    presets: t.ClassVar[dict[str, Preset]] = {
        "segment": Preset(
            description="Segment track calls: the event name, the Segment group as Orb's "
            "external customer id, the properties as they are.",
            filter="type == 'track'",
            fields={
                "idempotency_key": "messageId",
                "event_name": "event",
                "timestamp": "timestamp",
                "external_customer_id": "context.groupId",
                "properties": "properties",
            },
        ),
    }
    required_settings = ("orb_api_key",)
    settings: t.ClassVar[list[th.Property]] = [
        th.Property("orb_api_key", th.StringType, secret=True, description="Orb API key."),
        th.Property(
            "orb_api_url",
            th.StringType,
            default="https://api.withorb.com",
            description="Base URL of Orb's API (requests go to {orb_api_url}/v1/...).",
        ),
        th.Property(
            "orb_grace_period_hours",
            th.NumberType,
            default=DEFAULT_GRACE_HOURS,
            description="Orb's ingestion grace period for the account: older events are "
            "refused locally (dead-lettered) instead of failing a request; backfill them "
            f"with Orb's backfill flow. Range: more than 0 to {MAX_GRACE_HOURS:,}.",
        ),
        th.Property(
            "orb_backfill",
            th.BooleanType,
            default=False,
            description="Send events older than orb_grace_period_hours through Orb's backfill "
            f"flow instead of dead-lettering them: a backfill per customer and {BACKFILL_DAYS}-day "
            "timeframe, its events ingested with its id, closed once the run delivered everything "
            "(only then does Orb bill them, and only then does a STATE cover them), reverted when "
            "the run fails.",
        ),
        th.Property(
            "orb_backfill_replace_existing_events",
            th.BooleanType,
            default=False,
            description="Create the backfills with replace_existing_events: Orb then drops the "
            "customer's events already in each backfill's whole timeframe (up to "
            f"{BACKFILL_DAYS} days) and keeps only this run's. Only for re-sending complete "
            "history; off, backfilled events are added to what Orb holds.",
        ),
    ]

    def __init__(self, config: t.Mapping[str, t.Any], transport: t.Any):
        super().__init__(config, transport)
        self.grace_hours = float(config.get("orb_grace_period_hours") or DEFAULT_GRACE_HOURS)
        self._window = TimeWindow(dt.timedelta(hours=self.grace_hours), MAX_AHEAD)
        self.backfills = (
            Backfills(self, bool(config.get("orb_backfill_replace_existing_events")))
            if config.get("orb_backfill")
            else None
        )
        self.uses_channels = self.backfills is not None

    @classmethod
    def config_errors(cls, config: t.Mapping[str, t.Any], *, dry_run: bool) -> list[str]:
        problems = super().config_errors(config, dry_run=dry_run)
        grace = config.get("orb_grace_period_hours")
        # a finite number: the settings schema and the settings check say so
        if grace is not None and not 0 < float(grace) <= MAX_GRACE_HOURS:
            limit = f"more than 0 and at most {MAX_GRACE_HOURS:,}"
            problems.append(f"orb_grace_period_hours: must be {limit}, got {grace}")
        return problems

    @classmethod
    def field_specs(cls, config: t.Mapping[str, t.Any]) -> list[FieldSpec]:
        return [
            FieldSpec("idempotency_key", FieldKind.ID),
            FieldSpec("event_name", FieldKind.STRING, required=True),
            FieldSpec("timestamp", FieldKind.TIMESTAMP, required=True),
            FieldSpec("customer_id", FieldKind.STRING),
            FieldSpec("external_customer_id", FieldKind.STRING),
            # required by Orb even when empty
            FieldSpec("properties", FieldKind.OBJECT, default={}),
        ]

    def validate_payload(self, payload: dict[str, t.Any]) -> str | None:
        # Each of these fails Orb's whole request: refuse the one event here instead.
        if ("customer_id" in payload) == ("external_customer_id" in payload):
            return "give exactly one of customer_id and external_customer_id (Orb requires one, not both)"
        where = self._window.outside(payload["timestamp"])
        if where == "past" and self.backfills is None:
            return OutsideWindow(
                f"timestamp is older than Orb's ingestion grace period ({self.grace_hours:g} h, "
                "orb_grace_period_hours): turn on orb_backfill to send it through Orb's backfill "
                f"flow, got {payload['timestamp']}"
            )
        if where == "future":
            return f"timestamp {payload['timestamp']} is more than 5 minutes in the future (Orb refuses it)"
        for key, value in payload["properties"].items():
            if isinstance(value, dict | list):
                return f"properties.{key}: Orb takes numbers, booleans and strings only, not nested values"
        return None

    # --- backfills: older usage goes to its backfill, not to the live ingest ------------

    channel_noun = "backfills"

    def channels(self, bodies: Sequence[bytes]) -> list[tuple[str | None, list[int]]] | None:
        if self.backfills is None:
            return None
        return self.backfills.route(bodies)

    def channel_request(self, body: bytes, channel: str) -> OutgoingRequest:
        request = self.ingest_request(body)
        url = f"{request.url}?backfill_id={urllib.parse.quote(channel, safe='')}"
        return OutgoingRequest(request.method, url, request.headers, body)

    def channel_acknowledged(self, channel: str, count: int) -> None:
        if self.backfills is not None:
            self.backfills.acknowledged(channel, count)

    def settle_channels(self, succeeded: bool) -> None:
        if self.backfills is not None:
            self.backfills.settle(succeeded)

    def channel_summary(self) -> list[str]:
        return self.backfills.summary() if self.backfills is not None else []

    # --- read side: POST /v1/events/search by idempotency key -----------------------

    def check_items(self, ids: list[str], window: Window) -> dict[str, ItemCheck]:
        body = {"event_ids": ids, "timeframe_start": iso(window.start), "timeframe_end": iso(window.end)}
        found = read_json(
            self, "POST", f"{self.api_url}/v1/events/search", self._headers(), body, setting=self.key_setting
        )
        events = found.get("data", []) if isinstance(found, dict) else []
        return {str(event.get("id")): ItemCheck(True) for event in events if not event.get("deprecated")}

    def hourly_volume(self, window: Window) -> dict[str, int] | None:
        """``GET /v1/events/volume`` (the SDK's ``events.volume.list``): counts per UTC hour
        ("YYYY-MM-DDTHH"), paged."""
        hours: dict[str, int] = {}
        cursor = None
        while True:
            query = {"timeframe_start": iso(window.start), "timeframe_end": iso(window.end), "limit": 500}
            if cursor:
                query["cursor"] = cursor
            url = f"{self.api_url}/v1/events/volume?{urllib.parse.urlencode(query)}"
            page = read_json(self, "GET", url, self._headers(), setting=self.key_setting)
            page = page if isinstance(page, dict) else {}
            for volume in page.get("data") or []:
                hour = hour_of(str(volume.get("timeframe_start", "")))
                hours[hour] = hours.get(hour, 0) + int(volume.get("count") or 0)
            cursor = (page.get("pagination_metadata") or {}).get("next_cursor")
            if not cursor:
                return hours

    def refusal_detail(self, response: t.Any) -> str:
        return _validation_failures(response)

    def judge_acknowledgement(self, response: t.Any) -> Ruling | None:
        failed = json_document(response).get("validation_failed")
        if not isinstance(failed, list):
            return self.not_acknowledged(response, "no validation_failed list")
        if failed:  # Orb says this never happens with a 200; if it does, isolate them
            return Ruling(Verdict.REJECTED, f"Orb answered 200: {_validation_failures(response)}"[:1000])
        return None


def _validation_failures(response: t.Any) -> str:
    """Orb's per-event reasons, on one line: ``key: reason; ...``."""
    try:
        document = json.loads(response.body)
        failed = document["validation_failed"]
        parts = [f"{entry['idempotency_key']}: {'; '.join(entry['validation_errors'])}" for entry in failed]
    except (ValueError, KeyError, TypeError):
        return response.text()
    return " | ".join(parts)[:1000] if parts else response.text()
