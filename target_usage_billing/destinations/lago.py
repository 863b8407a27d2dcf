"""Lago: usage events to POST {api_url}/api/v1/events/batch.

Contract (confirmed against lago-python-client 1.55.0: ``models.event.Event``,
``EventClient.batch_create`` and ``make_headers``): Bearer API key; body
``{"events": [...]}``, at most 100 events; each event ``{transaction_id,
external_subscription_id, code, timestamp, properties, precise_total_amount_cents}``
with ``timestamp`` in Unix seconds (an integer, or decimal text with fractions: the SDK
types it ``int | str``). ``transaction_id`` de-duplicates; a Postgres-backed Lago refuses
an already stored one with 422 ``value_already_exist`` (and takes none of the request),
which the target counts as already stored, not as a rejection. A 422 names the refused
events by index in ``error_details`` and takes none of the request. Self-hosted Lago is
common: the URL is a setting.
"""

from __future__ import annotations

import json
import typing as t
import urllib.parse

from singer_sdk import typing as th

from target_usage_billing.destinations.base import Acknowledgement, BearerKeyDestination, Ruling, Verdict
from target_usage_billing.destinations.readback import ItemCheck, Window, read_json
from target_usage_billing.journal import JournalFields
from target_usage_billing.mapping import FieldKind, FieldSpec, Preset

ALREADY_EXISTS = "value_already_exist"


class LagoDestination(BearerKeyDestination):
    name = "lago"
    label = "Lago"
    item_noun = "events"
    envelope_key = "events"
    ingest_path = "/api/v1/events/batch"
    max_items_per_request = 100
    max_body_bytes = 4_000_000  # none published: keep requests reasonable
    rate_limits = ()  # none published: 429 + Retry-After is honoured instead
    key_setting = "lago_api_key"
    url_setting = "lago_api_url"
    # Lago answers a stored batch with {"events": [...]}
    acknowledgement = Acknowledgement((200,), "object", lists=("events",))  # the events it took
    journal_fields = JournalFields(
        "transaction_id", ("external_subscription_id",), "code", "timestamp", (("properties", None),)
    )
    default_url = "https://api.getlago.com"
    probe_path = "/api/v1/customers?per_page=1"
    presets: t.ClassVar[dict[str, Preset]] = {
        "segment": Preset(
            description="Segment track calls: the event name as the billable metric code, "
            "the Segment group as the external subscription id, the properties as they are.",
            filter="type == 'track'",
            fields={
                "transaction_id": "messageId",
                "code": "event",
                "timestamp": "timestamp",
                "external_subscription_id": "context.groupId",
                "properties": "properties",
            },
        ),
    }
    required_settings = ("lago_api_key",)
    settings: t.ClassVar[list[th.Property]] = [
        th.Property("lago_api_key", th.StringType, secret=True, description="Lago API key."),
        th.Property(
            "lago_api_url",
            th.StringType,
            default="https://api.getlago.com",
            description="Base URL of Lago's API (requests go to {lago_api_url}/api/v1/...); "
            "your own host for a self-hosted Lago.",
        ),
    ]

    @classmethod
    def field_specs(cls, config: t.Mapping[str, t.Any]) -> list[FieldSpec]:
        return [
            FieldSpec("transaction_id", FieldKind.ID),
            FieldSpec("external_subscription_id", FieldKind.STRING, required=True),
            FieldSpec("code", FieldKind.STRING, required=True),
            FieldSpec("timestamp", FieldKind.UNIX_TIME, required=True),
            FieldSpec("properties", FieldKind.OBJECT),
            FieldSpec("precise_total_amount_cents", FieldKind.STRING),
        ]

    # --- read side: GET /api/v1/events/{transaction_id}, one id a request -------------

    read_batch = 1

    def check_items(self, ids: list[str], window: Window) -> dict[str, ItemCheck]:
        checks = {}
        for item_id in ids:
            url = f"{self.api_url}/api/v1/events/{urllib.parse.quote(item_id, safe='')}"
            found = read_json(self, "GET", url, self._headers(), setting=self.key_setting, missing_ok=True)
            if found is not None:
                checks[item_id] = ItemCheck(True)
        return checks

    def judge_refusal(self, response: t.Any) -> Ruling | None:
        if response.status in (400, 422):
            details = _error_details(response)
            stored = tuple(
                sorted(int(index) for index, errors in details.items() if _stored_event(index, errors))
            )
            if stored:
                # the events Lago names as already stored are done; the others go again
                # (alone, any that Lago refuses for their content is then isolated)
                everything = len(stored) == len(details)
                verdict = Verdict.ALREADY_STORED if everything else Verdict.REJECTED
                message = f"Lago already has {len(stored)} of these events (value_already_exist)"
                return Ruling(verdict, message, stored)
        return super().judge_refusal(response)

    def refusal_detail(self, response: t.Any) -> str:
        return str(_error_details(response) or response.text())


def _error_details(response: t.Any) -> dict[str, t.Any]:
    """Lago's ``error_details``: per event index (as text), the refused fields and why."""
    try:
        details = json.loads(response.body).get("error_details")
    except (ValueError, AttributeError):
        return {}
    return details if isinstance(details, dict) else {}


def _stored_event(index: str, errors: t.Any) -> bool:
    """Whether Lago refused the event at ``index`` only for having it already."""
    return index.isdigit() and errors == {"transaction_id": [ALREADY_EXISTS]}
