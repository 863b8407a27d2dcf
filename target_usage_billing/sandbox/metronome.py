"""Metronome's read side, as the sandbox serves it (at the root, with the API token).

Confirmed against metronome-sdk 4.12.0 (``v1.usage.search``, ``UsageSearchResponse``):
``POST /v1/events/search`` with ``{"transactionIds": [...]}`` answers a JSON array of
the events found (ids not found are absent), each with ``matched_customer`` and
``matched_billable_metrics``. The sandbox matches every customer id (a customer named
after it, with a UUID derived from it) and every event type (a COUNT metric named after
it), except for an event reported invalid after the acknowledgement (fault
``invalid-after-ack``): ``matched_customer`` is null and no metric matches, which is how
Metronome says an event will not be billed. Only events of the last 34 days are found.
"""

from __future__ import annotations

import datetime as dt
import json
import typing as t

from target_usage_billing.sandbox.readside import Reader, answer, decode, iso, parse_time, stable_id
from target_usage_billing.sandbox.replies import Reply

MAX_IDS = 100
WINDOW = dt.timedelta(days=34)


def read_route(method: str, path: str, headers: t.Mapping[str, str], sandbox: t.Any) -> Reader | None:
    if method != "POST" or path != "/v1/events/search":
        return None

    def search(query: t.Mapping[str, list[str]], body: bytes) -> Reply:
        if headers.get("Authorization") != f"Bearer {sandbox.settings.metronome_api_token}":
            raise answer(403, {"message": "Unauthorized: invalid API token"})
        return _search(body, sandbox)

    return search


def _search(body: bytes, sandbox: t.Any) -> Reply:
    try:
        ids = json.loads(body or b"{}")["transactionIds"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise TypeError("transactionIds must be a list of strings")
    except KeyError:
        raise answer(400, {"message": "transactionIds is required"}) from None
    except (ValueError, TypeError) as exc:
        raise answer(400, {"message": f"invalid request: {exc}"}) from None
    if not 1 <= len(ids) <= MAX_IDS:
        raise answer(400, {"message": f"transactionIds must hold 1 to {MAX_IDS} ids, got {len(ids)}"})
    oldest = dt.datetime.now(dt.timezone.utc) - WINDOW
    found = []
    store = sandbox.stores["metronome"]
    for transaction_id in dict.fromkeys(ids):
        with sandbox.lock:
            item = store.get(transaction_id)
        if item is None:
            continue
        event = decode(item.raw)
        if parse_time(event["timestamp"]) < oldest:
            continue
        customer = {"id": stable_id("metronome-customer", event["customer_id"]), "name": event["customer_id"]}
        metric = {
            "id": stable_id("metronome-metric", event["event_type"]),
            "name": event["event_type"],
            "aggregation_type": "COUNT",
            "event_type_filter": {"in_values": [event["event_type"]]},
        }
        found.append(
            {
                "id": stable_id("metronome-event", transaction_id),
                "transaction_id": transaction_id,
                "customer_id": event["customer_id"],
                "event_type": event["event_type"],
                "timestamp": event["timestamp"],
                "properties": event.get("properties") or {},
                "is_duplicate": False,
                "processed_at": iso(item.received_at),
                "matched_customer": None if item.invalid else customer,
                "matched_billable_metrics": [] if item.invalid else [metric],
            }
        )
    return answer(200, found)
