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
import logging
import threading
import typing as t
import uuid
from collections.abc import Sequence

import msgspec
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
from target_usage_billing.destinations.readback import ItemCheck, Window, iso, read_json
from target_usage_billing.errors import DeliveryError, UsageBillingError
from target_usage_billing.journal import JournalFields
from target_usage_billing.mapping import FieldKind, FieldSpec, Preset

logger = logging.getLogger("target-usage-billing.orb")

MAX_AHEAD = dt.timedelta(minutes=5)
DEFAULT_GRACE_HOURS = 12.0
MAX_GRACE_HOURS = 10 * 8760  # ten years: far beyond any grace period, within what a timedelta holds
# A backfill's timeframe: at most 31 days (Orb's default limit). The target cuts time into
# fixed 31-day slots from the Unix epoch, so that every run asks for the same timeframes.
BACKFILL_DAYS = 31
BACKFILL_PATH = "/v1/events/backfills"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class _Routing(msgspec.Struct):
    """What routing an event needs of it (the rest of the body is skipped unread)."""

    timestamp: str
    customer_id: str | None = None
    external_customer_id: str | None = None


_routing_decoder = msgspec.json.Decoder(_Routing)


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
        return OutgoingRequest(request.method, f"{request.url}?backfill_id={channel}", request.headers, body)

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


class _Backfill:
    __slots__ = ("closed", "customer", "end", "events", "id", "start")

    def __init__(self, backfill_id: str, customer: tuple[str, str], start: dt.datetime, end: dt.datetime):
        self.id = backfill_id
        self.customer = customer  # (customer_id | external_customer_id, value)
        self.start, self.end = start, end
        self.events = 0  # acknowledged into it
        self.closed = False

    def describe(self) -> str:
        return f"{self.id} ({self.customer[0]} {self.customer[1]!r}, {iso(self.start)} to {iso(self.end)})"


class Backfills:
    """The backfills of one run: opened when an event older than the grace period meets
    one, closed together once the run delivered everything, reverted if it did not.

    Called by the delivery workers (route, acknowledged) and at the end of the run
    (settle). Their number grows with customers x 31-day slots, never with events.
    """

    def __init__(self, orb: OrbDestination, replace: bool):
        self.orb = orb
        self.replace = replace
        self._lock = threading.Lock()
        # (field, customer, slot) -> the slot's backfills, in timeframe order
        self._slots: dict[tuple[str, str, int], list[_Backfill]] = {}
        self._by_id: dict[str, _Backfill] = {}
        self._run_key = uuid.uuid4().hex  # idempotency keys of this run's create requests
        self.settled: str | None = None  # "closed" or "reverted"

    def route(self, bodies: Sequence[bytes]) -> list[tuple[str | None, list[int]]] | None:
        """Events in the grace period go live (None); older ones to their backfill."""
        groups: dict[str | None, list[int]] = {}
        late = False
        for position, body in enumerate(bodies):
            event = _routing_decoder.decode(body)
            channel = None
            if self.orb._window.outside(event.timestamp) == "past":
                channel = self._backfill_for(event).id
                late = True
            groups.setdefault(channel, []).append(position)
        return list(groups.items()) if late else None

    def _backfill_for(self, event: _Routing) -> _Backfill:
        if event.customer_id is not None:
            customer = ("customer_id", event.customer_id)
        else:
            customer = ("external_customer_id", str(event.external_customer_id))
        moment = dt.datetime.fromisoformat(event.timestamp.replace("Z", "+00:00"))
        slot = (moment - _EPOCH).days // BACKFILL_DAYS
        with self._lock:
            if self.settled is not None:
                raise DeliveryError(f"Orb backfills were already {self.settled}: no event can join them now")
            found = self._slots.setdefault((*customer, slot), [])
            for backfill in found:
                if backfill.start <= moment < backfill.end:
                    return backfill
            # The slot's next timeframe starts where its last one ended, and ends at the
            # grace boundary (Orb takes no backfill reaching into the grace period) or the
            # slot's end. The event is older than that boundary, so it falls inside.
            slot_start = _EPOCH + dt.timedelta(days=slot * BACKFILL_DAYS)
            start = found[-1].end if found else slot_start
            boundary = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=self.orb.grace_hours)
            end = min(slot_start + dt.timedelta(days=BACKFILL_DAYS), boundary.replace(microsecond=0))
            backfill = self._create(customer, start, end)
            found.append(backfill)
            self._by_id[backfill.id] = backfill
            return backfill

    def _create(self, customer: tuple[str, str], start: dt.datetime, end: dt.datetime) -> _Backfill:
        body = {
            "timeframe_start": iso(start),
            "timeframe_end": iso(end),
            customer[0]: customer[1],
            "replace_existing_events": self.replace,
        }
        # the same key on a retry: a create whose answer was lost is not made twice
        key = f"{self._run_key}-{customer[0]}-{customer[1]}-{iso(start)}"
        document = self._call("POST", BACKFILL_PATH, body, idempotency_key=key)
        backfill = _Backfill(str(document["id"]), customer, start, end)
        logger.info(
            "Orb backfill %s created%s",
            backfill.describe(),
            " (replace_existing_events)" if self.replace else "",
        )
        return backfill

    def acknowledged(self, backfill_id: str, count: int) -> None:
        with self._lock:
            self._by_id[backfill_id].events += count

    def settle(self, succeeded: bool) -> None:
        """Close every backfill (the run delivered everything), or revert them all: a
        close that fails reverts the ones closed before it too, so that the run's history
        lands whole or not at all (a STATE covers it only in the first case)."""
        with self._lock:
            if self.settled is not None or not self._by_id:
                return
            backfills = list(self._by_id.values())
            self.settled = "closed" if succeeded else "reverted"
        if succeeded:
            try:
                for backfill in backfills:
                    self._call("POST", f"{BACKFILL_PATH}/{backfill.id}/close", None)
                    backfill.closed = True
                    logger.info("Orb backfill %s closed: %d events", backfill.describe(), backfill.events)
                return
            except UsageBillingError as exc:
                self.settled = "reverted"
                self._revert_all(backfills)
                raise DeliveryError(
                    f"closing an Orb backfill failed, so the run's backfills were reverted: {exc}"
                ) from None
        self._revert_all(backfills)

    def _revert_all(self, backfills: list[_Backfill]) -> None:
        left = []
        for backfill in backfills:
            try:
                self._call("POST", f"{BACKFILL_PATH}/{backfill.id}/revert", None)
                logger.warning(
                    "Orb backfill %s reverted (%d events): the run did not deliver everything; "
                    "re-run from the last STATE",
                    backfill.describe(),
                    backfill.events,
                )
            except UsageBillingError as exc:
                left.append(backfill.id)
                logger.error("Orb backfill %s could not be reverted: %s", backfill.describe(), exc)
        if left:
            logger.error(
                "Revert Orb backfills %s yourself (POST /v1/events/backfills/ID/revert): Orb closes "
                "a pending backfill by itself a day after it was created",
                ", ".join(left),
            )

    def summary(self) -> list[str]:
        with self._lock:
            backfills = list(self._by_id.values())
        if not backfills:
            return []
        events = sum(b.events for b in backfills)
        return [f"  Orb backfills: {len(backfills)} {self.settled or 'open'}, {events} events in them"]

    def _call(
        self, method: str, path: str, body: t.Any, idempotency_key: str | None = None
    ) -> dict[str, t.Any]:
        orb = self.orb
        headers = orb._headers()
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        data = None if body is None else json.dumps(body).encode()

        def read(response: t.Any) -> dict[str, t.Any]:
            document = json_document(response)
            return document if isinstance(document, dict) else {}

        url = f"{orb.api_url}{path}"
        return orb.credential_request(
            method, url, headers, data, setting=orb.key_setting, credential="API key", read=read
        )
