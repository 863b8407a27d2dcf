"""OpenMeter: CloudEvents to POST {api_url}/api/v1/events.

Contract (confirmed against openmeter 1.0.0b236, the official Python SDK: ``Event`` and
``ingest_events``): ``Content-Type: application/cloudevents-batch+json`` and a JSON
array of CloudEvents ``{specversion: "1.0", id, source, type, subject, time, data}``
(``id``, ``source``, ``type`` and ``subject`` required; ``time`` RFC 3339; ``data`` a JSON
object); the answer to an accepted batch is 204 with no body; a malformed event fails
the whole request with 400 (problem details), a bad token 401. Ingestion is
asynchronous: OpenMeter de-duplicates by ``id`` + ``source``, so ``source`` must stay the
same from run to run (``openmeter_source``). OpenMeter Cloud takes a Bearer token;
a self-hosted OpenMeter usually none (leave ``openmeter_api_token`` unset).
"""

from __future__ import annotations

import typing as t
import urllib.parse

from singer_sdk import typing as th

from target_usage_billing.destinations.base import Acknowledgement, BearerKeyDestination
from target_usage_billing.destinations.readback import ItemCheck, Window, iso, read_json
from target_usage_billing.journal import JournalFields
from target_usage_billing.mapping import FieldKind, FieldSpec, Preset

DEFAULT_SOURCE = "target-usage-billing"


class OpenMeterDestination(BearerKeyDestination):
    name = "openmeter"
    label = "OpenMeter"
    item_noun = "events"
    envelope_key = None  # a bare array of CloudEvents
    ingest_path = "/api/v1/events"
    max_items_per_request = 500  # none published
    max_body_bytes = 4_000_000  # none published: keep requests reasonable
    rate_limits = ()
    key_setting = "openmeter_api_token"
    url_setting = "openmeter_api_url"
    # ingest_events expects exactly 204 No Content
    acknowledgement = Acknowledgement((204,), "empty")
    journal_fields = JournalFields("id", ("subject",), "type", "time", (("data", None),))
    default_url = "https://openmeter.cloud"
    probe_path = "/api/v1/meters"
    credential = "API token"
    content_type = "application/cloudevents-batch+json"
    presets: t.ClassVar[dict[str, Preset]] = {
        "segment": Preset(
            description="Segment track calls: the event name as the CloudEvents type, the "
            "Segment group as the subject, the properties as the data.",
            filter="type == 'track'",
            fields={
                "id": "messageId",
                "type": "event",
                "time": "timestamp",
                "subject": "context.groupId",
                "data": "properties",
            },
        ),
    }
    settings: t.ClassVar[list[th.Property]] = [
        th.Property(
            "openmeter_api_token",
            th.StringType,
            secret=True,
            description="OpenMeter Cloud API token (a self-hosted OpenMeter usually needs none).",
        ),
        th.Property(
            "openmeter_api_url",
            th.StringType,
            default="https://openmeter.cloud",
            description="Base URL of OpenMeter's API (requests go to {openmeter_api_url}/api/v1/...).",
        ),
        th.Property(
            "openmeter_source",
            th.StringType,
            default=DEFAULT_SOURCE,
            description="The CloudEvents source of every event (OpenMeter de-duplicates by id and "
            "source: keep it the same from run to run). A rule may map `source` instead.",
        ),
    ]

    @classmethod
    def field_specs(cls, config: t.Mapping[str, t.Any]) -> list[FieldSpec]:
        return [
            FieldSpec("specversion", FieldKind.STRING, default="1.0"),
            FieldSpec("id", FieldKind.ID),
            FieldSpec(
                "source", FieldKind.STRING, default=str(config.get("openmeter_source") or DEFAULT_SOURCE)
            ),
            FieldSpec("type", FieldKind.STRING, required=True),
            FieldSpec("subject", FieldKind.STRING, required=True),
            FieldSpec("time", FieldKind.TIMESTAMP, required=True),
            FieldSpec("data", FieldKind.OBJECT),
        ]

    def validate_payload(self, payload: dict[str, t.Any]) -> str | None:
        if payload["specversion"] != "1.0":
            return f"specversion {payload['specversion']!r}: OpenMeter takes CloudEvents 1.0 only"
        return None

    # --- read side: GET /api/v1/events, filtered by id ------------------------------

    read_batch = 1

    def check_items(self, ids: list[str], window: Window) -> dict[str, ItemCheck]:
        checks = {}
        for item_id in ids:
            query = urllib.parse.urlencode(
                {"id": item_id, "from": iso(window.start), "to": iso(window.end), "limit": 100}
            )
            listed = read_json(
                self,
                "GET",
                f"{self.api_url}/api/v1/events?{query}",
                self._headers(),
                setting=self.key_setting,
            )
            for entry in listed if isinstance(listed, list) else []:
                event = entry.get("event") or {}
                # (the id alone: a rule may map the source, which the journal does not keep)
                if event.get("id") == item_id:
                    checks[item_id] = ItemCheck(True, entry.get("validationError") or None)
        return checks
