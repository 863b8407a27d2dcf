"""Stripe: billing meter events on the high-throughput v2 stream.

Contract (confirmed against stripe 16.1.0, the official Python SDK:
``MeterEventSessionService``, ``MeterEventStreamService`` and
``MeterEventStreamCreateParams``): ``POST {api_url}/v2/billing/meter_event_session``
with the secret key gives a short-lived ``authentication_token`` (about 15 minutes) and
its ``expires_at``; ``POST {meter_events_url}/v2/billing/meter_event_stream`` with that
token as Bearer takes ``{"events": [...]}`` of at most 100, each ``{event_name,
identifier, timestamp, payload}`` with ``payload`` an object of strings holding the
meter's customer key (``stripe_customer_id`` unless the meter says otherwise) and value
key (``value``); ``identifier`` is unique within a rolling 24 hours; ``timestamp``
within the past 35 days and at most 5 minutes ahead. Events are validated
asynchronously; an expired session answers 401 and is renewed.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
import typing as t
import urllib.parse

from singer_sdk import typing as th

from target_usage_billing.destinations.base import (
    Acknowledgement,
    Destination,
    OutgoingRequest,
    OutsideWindow,
    Ruling,
    TimeWindow,
    Verdict,
)
from target_usage_billing.destinations.readback import TotalKey, Window, read_json
from target_usage_billing.destinations.tokens import ExpiringToken
from target_usage_billing.journal import JournalFields
from target_usage_billing.mapping import FieldKind, FieldSpec, Preset
from target_usage_billing.retry import RetryableFailure

# What a meter's value may be: a decimal number, as text (as mapping writes numbers).
NUMBER_TEXT = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)\Z")
# Stripe's windows: usage at most 35 days old and 5 minutes ahead; identifier
# de-duplicated for only 24 hours (rolling) after Stripe received it
MAX_AGE = dt.timedelta(days=35)
MAX_AHEAD = dt.timedelta(minutes=5)
DEDUP_WINDOW = dt.timedelta(hours=24)
SESSION_PATH = "/v2/billing/meter_event_session"


class StripeDestination(Destination):
    name = "stripe"
    label = "Stripe"
    item_noun = "meter events"
    envelope_key = "events"
    # Stripe's v2 answers are JSON (the SDK parses every body it gets); events are
    # validated later, so this says only that the stream took them
    acknowledgement = Acknowledgement((200, 202), "object")
    url_setting = "stripe_meter_events_url"
    journal_fields = JournalFields("identifier", ("payload.stripe_customer_id",), "event_name", "timestamp")
    ingest_path = "/v2/billing/meter_event_stream"
    dedup_window = DEDUP_WINDOW
    max_age = MAX_AGE
    max_items_per_request = 100
    max_body_bytes = 4_000_000  # none published: keep requests reasonable
    rate_limits = ()  # 10,000 requests/s in live mode: 429 + Retry-After is honoured instead
    presets: t.ClassVar[dict[str, Preset]] = {
        "segment": Preset(
            description="Segment track calls: the event name as the meter's event name, the "
            "Segment group as the Stripe customer, properties.value as the value.",
            filter="type == 'track'",
            fields={
                "identifier": "messageId",
                "event_name": "event",
                "timestamp": "timestamp",
                "payload": {"stripe_customer_id": "context.groupId", "value": "properties.value"},
            },
        ),
    }
    required_settings = ("stripe_api_key",)
    settings: t.ClassVar[list[th.Property]] = [
        th.Property(
            "stripe_api_key",
            th.StringType,
            secret=True,
            description="Stripe secret key (it creates the meter event sessions).",
        ),
        th.Property(
            "stripe_api_url",
            th.StringType,
            default="https://api.stripe.com",
            description="Base URL of Stripe's API (meter event sessions).",
        ),
        th.Property(
            "stripe_meter_events_url",
            th.StringType,
            default="https://meter-events.stripe.com",
            description="Base URL of Stripe's meter event stream.",
        ),
        th.Property(
            "stripe_value_keys",
            th.ArrayType(th.StringType),
            default=["value"],
            description="Payload keys that carry a meter's value (its value_settings "
            "event_payload_key): each must be a number as text, or Stripe drops the event after "
            "accepting it, so such records are dead-lettered instead.",
        ),
        th.Property(
            "stripe_payload_keys",
            th.ArrayType(th.StringType),
            default=["stripe_customer_id", "value"],
            description="Keys every payload must hold: your meters' customer_mapping and "
            "value_settings event_payload_key (Stripe's defaults: stripe_customer_id, value).",
        ),
    ]

    renewal_checks_credentials = True  # a bad key is refused when a session is made

    def __init__(self, config: t.Mapping[str, t.Any], transport: t.Any):
        super().__init__(config, transport)
        self.api_url = str(config.get("stripe_api_url") or "https://api.stripe.com").rstrip("/")
        self.events_url = str(
            config.get("stripe_meter_events_url") or "https://meter-events.stripe.com"
        ).rstrip("/")
        self.payload_keys = tuple(config.get("stripe_payload_keys") or ("stripe_customer_id", "value"))
        self.value_keys = tuple(config.get("stripe_value_keys") or ("value",))
        self._window = TimeWindow(MAX_AGE, MAX_AHEAD)
        self._session = ExpiringToken(self._new_session)

    @classmethod
    def field_specs(cls, config: t.Mapping[str, t.Any]) -> list[FieldSpec]:
        return [
            FieldSpec("identifier", FieldKind.ID),
            FieldSpec("event_name", FieldKind.STRING, required=True),
            FieldSpec("timestamp", FieldKind.TIMESTAMP, required=True),
            # strings: numbers go as their exact decimal text
            FieldSpec("payload", FieldKind.STRING_MAP, required=True),
        ]

    def validate_payload(self, payload: dict[str, t.Any]) -> str | None:
        values = payload["payload"]
        missing = [key for key in self.payload_keys if not values.get(key, "").strip()]
        if missing:
            return f"payload needs {', '.join(missing)} (the meter's event payload keys, stripe_payload_keys)"
        for key in self.value_keys:
            value = values.get(key)
            if value is not None and not NUMBER_TEXT.match(value):
                return (
                    f"payload.{key}: {value[:80]!r} is not a number; Stripe would accept the event "
                    "and drop it later (stripe_value_keys)"
                )
        where = self._window.outside(payload["timestamp"])
        if where == "past":
            return OutsideWindow(
                f"timestamp is more than {MAX_AGE.days} days in the past (Stripe refuses usage older "
                f"than its window), got {payload['timestamp']}"
            )
        if where == "future":
            return (
                f"timestamp {payload['timestamp']} is more than 5 minutes in the future (Stripe refuses it)"
            )
        return None

    # --- auth: a meter event session ------------------------------------------------

    def _new_session(self) -> tuple[str, float]:
        url = f"{self.api_url}{SESSION_PATH}"
        headers = {
            "Authorization": f"Bearer {self.config.get('stripe_api_key', '')}",
            "Content-Type": "application/json",
        }
        return self.credential_request(
            "POST",
            url,
            headers,
            b"{}",
            setting="stripe_api_key",
            credential="secret key",
            path=SESSION_PATH,
            read=_token_and_lifetime,
        )

    def journal_layout(self) -> JournalFields:
        # the customer key: the first payload key that is not a value key
        customer = next((k for k in self.payload_keys if k not in self.value_keys), "stripe_customer_id")
        values = tuple(("payload", (key,)) for key in self.value_keys)
        return JournalFields("identifier", (f"payload.{customer}",), "event_name", "timestamp", values)

    def check_credentials(self) -> None:
        self._session.get()

    def refresh_credentials(self, stale: OutgoingRequest) -> None:
        self._session.drop(stale.headers.get("Authorization", "").removeprefix("Bearer "))

    def live_secrets(self) -> list[str]:
        token = self._session.current
        return [token] if token else []

    # --- requests --------------------------------------------------------------------

    def ingest_request(self, body: bytes) -> OutgoingRequest:
        headers = {"Authorization": f"Bearer {self._session.get()}", "Content-Type": "application/json"}
        return OutgoingRequest("POST", f"{self.events_url}{self.ingest_path}", headers, body)

    def judge_refusal(self, response: t.Any) -> Ruling | None:
        status = response.status
        if status == 401:  # the session expired: a new one, once
            return Ruling(Verdict.REAUTH, f"Stripe answered 401 ({response.text(200)})")
        if status == 403:
            return Ruling(
                Verdict.DENIED, "Stripe refused the meter event session (403): check stripe_api_key"
            )
        if status in (400, 422):
            return Ruling(Verdict.REJECTED, f"Stripe answered {status}: {response.text()}"[:1000])
        return None

    # --- read side: meter event summaries, meter error reports ------------------------

    read_back = "totals"

    def _read(self, path: str, query: dict[str, t.Any]) -> t.Any:
        url = f"{self.api_url}{path}?{urllib.parse.urlencode(query)}"
        headers = {"Authorization": f"Bearer {self.config.get('stripe_api_key', '')}"}
        return read_json(self, "GET", url, headers, setting="stripe_api_key")

    def _list(self, path: str, query: dict[str, t.Any]) -> t.Iterator[dict]:
        after = None
        while True:
            page = self._read(path, {**query, "limit": 100, **({"starting_after": after} if after else {})})
            data = page.get("data") or []
            yield from data
            if not page.get("has_more") or not data:
                return
            after = data[-1].get("id")

    def _meters(self) -> dict[str, str]:
        """Meter id by event name."""
        return {str(m.get("event_name")): str(m.get("id")) for m in self._list("/v1/billing/meters", {})}

    def platform_totals(self, wanted: set[TotalKey], window: Window) -> dict[TotalKey, decimal.Decimal]:
        meters = self._meters()
        value_field = f"payload.{self.value_keys[0]}"
        totals: dict[TotalKey, decimal.Decimal] = {}
        for customer, meter in sorted({(c, m) for c, m, _d, name in wanted if name == value_field}):
            meter_id = meters.get(meter)
            if meter_id is None:
                continue  # no meter with this event name: nothing is billed (reported)
            query = {
                "customer": customer,
                "start_time": int(window.start.timestamp()),
                "end_time": int(window.end.timestamp()),
                "value_grouping_window": "day",
            }
            for summary in self._list(f"/v1/billing/meters/{meter_id}/event_summaries", query):
                day = dt.datetime.fromtimestamp(int(summary["start_time"]), dt.timezone.utc).strftime(
                    "%Y-%m-%d"
                )
                key = (customer, meter, day, value_field)
                totals[key] = totals.get(key, decimal.Decimal(0)) + decimal.Decimal(
                    str(summary["aggregated_value"])
                )
        return totals

    def invalid_items(self, window: Window) -> dict[str, str]:
        invalid = {}
        for meter_id in self._meters().values():
            query = {"object_id": meter_id, "types": "v1.billing.meter.error_report_triggered"}
            for event in (self._read("/v2/core/events", query) or {}).get("data") or []:
                for error in ((event.get("data") or {}).get("reason") or {}).get("error_types") or []:
                    for sample in error.get("sample_errors") or []:
                        identifier = (sample.get("request") or {}).get("identifier")
                        if identifier:
                            reason = f"{error.get('code')}: {sample.get('error_message')}"
                            invalid[str(identifier)] = reason
        return invalid

    def reauth_failed_message(self, status: int) -> str:
        return f"Stripe refused a new meter event session too ({status}): check stripe_api_key"


def _token_and_lifetime(response: t.Any) -> tuple[str, float]:
    """The session's token and the seconds it has left."""
    try:
        document = json.loads(response.body)
        expires = dt.datetime.fromisoformat(document["expires_at"].replace("Z", "+00:00"))
        lifetime = (expires - dt.datetime.now(dt.timezone.utc)).total_seconds()
        return document["authentication_token"], lifetime
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RetryableFailure(f"Stripe POST {SESSION_PATH}: unreadable answer") from None
