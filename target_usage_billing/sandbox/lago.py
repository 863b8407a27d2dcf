"""Lago's batch ingest contract, as the sandbox enforces it (served under /lago).

Confirmed against lago-python-client 1.55.0 (``models.event.Event``,
``EventClient.batch_create``, ``verify_response``): ``POST /api/v1/events/batch`` with a
Bearer API key and ``{"events": [...]}`` of at most 100; each event needs
``transaction_id``, ``external_subscription_id`` and ``code`` (text), and may give
``timestamp`` (Unix seconds: an integer, or its decimal text), ``properties`` (an object)
and ``precise_total_amount_cents`` (decimal text). A request with a refused event takes
none of them and answers 422 ``{"status", "error", "code": "validation_errors",
"error_details": {INDEX: {FIELD: [REASON]}}}``; an already stored ``transaction_id`` is
refused that way with ``value_already_exist`` (as a Postgres-backed Lago does). A valid
request answers 200 with the stored events.
"""

from __future__ import annotations

import datetime as dt
import re
import typing as t
import urllib.parse

import msgspec

from target_usage_billing.sandbox.readside import Reader, answer, decode, iso, item_time, stable_id
from target_usage_billing.sandbox.replies import Reply, json_reply

NAME = "lago"
PREFIX = "/lago"
INGEST_PATH = "/api/v1/events/batch"
ID_FIELD = "transaction_id"
MAX_EVENTS = 100
_UNIX_TEXT = re.compile(r"-?\d+(\.\d+)?\Z")

_body_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_events_decoder = msgspec.json.Decoder(list[msgspec.Raw])


def _unprocessable(details: dict[str, t.Any]) -> Reply:
    document = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors"}
    return json_reply(422, {**document, "error_details": details})


def authenticate(headers: t.Mapping[str, str], settings: t.Any) -> None:
    if headers.get("Authorization") != f"Bearer {settings.lago_api_key}":
        raise json_reply(401, {"status": 401, "error": "Unauthorized"})


def items(body: bytes, query: t.Mapping[str, list[str]], settings: t.Any) -> list[tuple[str | None, bytes]]:
    """(transaction_id, raw event) of a valid request; a 422 Reply otherwise."""
    try:  # raw events are stored as sent: their numbers keep every digit
        raw_events = _events_decoder.decode(_body_decoder.decode(body)["events"])
        events = [msgspec.json.decode(raw) for raw in raw_events]
    except KeyError:
        raise _unprocessable({"events": ["value_is_mandatory"]}) from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise json_reply(400, {"status": 400, "error": "Bad Request", "code": str(exc)}) from None
    if not events:
        raise _unprocessable({"events": ["value_is_mandatory"]})
    if len(events) > MAX_EVENTS:
        raise _unprocessable({"events": ["too_many_events"]})
    details: dict[str, t.Any] = {}
    out: list[tuple[str | None, bytes]] = []
    seen: set[str] = set()
    for index, (event, raw) in enumerate(zip(events, raw_events)):
        errors = _event_errors(event)
        if errors:
            details[str(index)] = errors
            continue
        key: str = event["transaction_id"]  # text: checked above
        if key in seen:
            details[str(index)] = {"transaction_id": ["value_already_exist"]}
            continue
        seen.add(key)
        out.append((key, bytes(raw)))
    if details:
        raise _unprocessable(details)
    return out


def already_stored(items: list[tuple[str | None, bytes]], stored: t.Container[str]) -> None:
    """A Postgres-backed Lago refuses a transaction_id it already has (none is taken)."""
    details = {
        str(index): {"transaction_id": ["value_already_exist"]}
        for index, (key, _raw) in enumerate(items)
        if key in stored
    }
    if details:
        raise _unprocessable(details)


def refusal(index: int, item_id: str | None, reason: str) -> Reply:
    return _unprocessable({str(index): {"properties": [reason]}})


def accepted(new: list[str], duplicate: list[str], query: t.Mapping[str, list[str]]) -> Reply:
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    return json_reply(200, {"events": [{"transaction_id": key, "created_at": now} for key in new]})


def other_route(method: str, path: str, headers: t.Mapping[str, str], settings: t.Any) -> Reply | None:
    """``GET /api/v1/customers`` (the target's credentials probe), else None."""
    if method == "GET" and path == "/api/v1/customers":
        authenticate(headers, settings)
        return json_reply(200, {"customers": [], "meta": {"current_page": 1, "total_count": 0}})
    return None


def _event_errors(event: t.Any) -> dict[str, list[str]]:
    if not isinstance(event, dict):
        return {"event": ["invalid_type"]}
    errors: dict[str, list[str]] = {}
    for name in ("transaction_id", "external_subscription_id", "code"):
        value = event.get(name)
        if not isinstance(value, str) or not value:
            errors[name] = ["value_is_mandatory" if value in (None, "") else "invalid_type"]
    stamp = event.get("timestamp")
    if stamp is not None and not (
        (isinstance(stamp, int) and not isinstance(stamp, bool))
        or (isinstance(stamp, str) and _UNIX_TEXT.match(stamp))
    ):
        errors["timestamp"] = ["invalid_format"]
    if event.get("properties") is not None and not isinstance(event["properties"], dict):
        errors["properties"] = ["invalid_type"]
    cents = event.get("precise_total_amount_cents")
    if cents is not None and not (isinstance(cents, str) and _UNIX_TEXT.match(cents)):
        errors["precise_total_amount_cents"] = ["invalid_value"]
    unknown = set(event) - {
        "transaction_id",
        "external_subscription_id",
        "code",
        "timestamp",
        "properties",
        "precise_total_amount_cents",
    }
    for name in sorted(unknown):
        errors[name] = ["unknown_field"]
    return errors


# --- the read side (lago-python-client 1.55.0: ``events.find``) -----------------------------
# Lago validates in the request, so nothing is reported invalid after its 200: the fault
# invalid-after-ack does not apply to Lago (lost-after-ack does).


def read_route(method: str, path: str, headers: t.Mapping[str, str], sandbox: t.Any) -> Reader | None:
    """``GET /api/v1/events/{transaction_id}``, else None."""
    prefix = "/api/v1/events/"
    if method != "GET" or not path.startswith(prefix) or "/" in path[len(prefix) :]:
        return None
    key = urllib.parse.unquote(path[len(prefix) :])

    def find(query: t.Mapping[str, list[str]], body: bytes) -> Reply:
        authenticate(headers, sandbox.settings)
        with sandbox.lock:
            item = sandbox.stores[NAME].get(key)
        if item is None:
            raise answer(404, {"status": 404, "error": "Not Found", "code": "event_not_found"})
        event = decode(item.raw)
        moment = item_time(event.get("timestamp"), item.received_at)
        document = {
            "lago_id": stable_id("lago-event", key),
            "transaction_id": key,
            "lago_customer_id": None,
            "lago_subscription_id": None,
            "external_subscription_id": event["external_subscription_id"],
            "code": event["code"],
            "timestamp": iso(moment),
            "precise_total_amount_cents": event.get("precise_total_amount_cents"),
            "properties": event.get("properties") or {},
            "created_at": iso(item.received_at, millis=False),
        }
        return answer(200, {"event": document})

    return find
