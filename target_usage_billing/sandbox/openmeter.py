"""OpenMeter's ingest contract, as the sandbox enforces it (served under /openmeter).

Confirmed against openmeter 1.0.0b236 (``Event``, ``ingest_events``):
``POST /api/v1/events`` with ``Content-Type: application/cloudevents-batch+json`` and a
JSON array of CloudEvents 1.0 (``id``, ``source``, ``type``, ``subject`` required text;
``time`` RFC 3339; ``data`` an object); 204 and no body when accepted; one malformed event
fails the whole request with 400 problem details (``application/problem+json``), a bad
token 401. De-duplication is by ``id`` + ``source`` (the real API does it after the
answer; the sandbox when storing). The sandbox checks a Bearer token (as OpenMeter
Cloud does) unless it is started with an empty ``--openmeter-api-token``.
"""

from __future__ import annotations

import datetime as dt
import re
import typing as t

import msgspec

from target_usage_billing.sandbox.readside import (
    Reader,
    answer,
    decode,
    first,
    iso,
    item_time,
    many,
    parse_time,
)
from target_usage_billing.sandbox.replies import Reply, json_reply

NAME = "openmeter"
PREFIX = "/openmeter"
INGEST_PATH = "/api/v1/events"
ID_FIELD = ("source", "id")  # de-duplication key
MAX_EVENTS = 500  # none published: the target's own limit
BATCH_TYPE = "application/cloudevents-batch+json"
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)\Z")
# CloudEvents extension attributes: lower-case letters and digits, at most 20 of them
_EXTENSION = re.compile(r"[a-z0-9]{1,20}\Z")

_events_decoder = msgspec.json.Decoder(list[msgspec.Raw])


def _problem(status: int, title: str, detail: str) -> Reply:
    document = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return Reply(status, msgspec.json.encode(document), {"Content-Type": "application/problem+json"})


def authenticate(headers: t.Mapping[str, str], settings: t.Any) -> None:
    token = settings.openmeter_api_token
    if token and headers.get("Authorization") != f"Bearer {token}":
        raise _problem(401, "Unauthorized", "invalid or missing API token")


def check_request(headers: t.Mapping[str, str]) -> None:
    content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type != BATCH_TYPE:
        raise _problem(400, "Bad Request", f"a batch of events needs Content-Type {BATCH_TYPE}")


def items(body: bytes, query: t.Mapping[str, list[str]], settings: t.Any) -> list[tuple[str | None, bytes]]:
    """("source\\0id", raw event) of a valid batch; a 400 Reply otherwise."""
    try:
        raw_events = _events_decoder.decode(body)
        events = [msgspec.json.decode(raw) for raw in raw_events]
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _problem(400, "Bad Request", f"body must be a JSON array of CloudEvents: {exc}") from None
    if not 1 <= len(events) <= MAX_EVENTS:
        raise _problem(400, "Bad Request", f"send 1 to {MAX_EVENTS} events, got {len(events)}")
    out: list[tuple[str | None, bytes]] = []
    for index, (event, raw) in enumerate(zip(events, raw_events)):
        problem = _event_problem(event)
        if problem:
            raise _problem(400, "Bad Request", f"event [{index}]: {problem}")
        out.append((f"{event['source']}\x00{event['id']}", bytes(raw)))
    return out


def refusal(index: int, item_id: str | None, reason: str) -> Reply:
    return _problem(400, "Bad Request", f"event [{index}]: {reason}")


def accepted(new: list[str], duplicate: list[str], query: t.Mapping[str, list[str]]) -> Reply:
    return Reply(204)


def other_route(method: str, path: str, headers: t.Mapping[str, str], settings: t.Any) -> Reply | None:
    """``GET /api/v1/meters`` (the target's credentials probe), else None."""
    if method == "GET" and path == "/api/v1/meters":
        authenticate(headers, settings)
        return json_reply(200, [])
    return None


def _event_problem(event: t.Any) -> str | None:
    if not isinstance(event, dict):
        return "a CloudEvent must be an object"
    if event.get("specversion") != "1.0":
        return f'specversion must be "1.0", got {event.get("specversion")!r}'
    for name in ("id", "source", "type", "subject"):
        value = event.get(name)
        if not isinstance(value, str) or not value:
            return f"{name} is required (non-empty text)"
    time = event.get("time")
    if time is not None and not (isinstance(time, str) and _RFC3339.match(time)):
        return f"time {time!r} is not RFC 3339"
    data = event.get("data")
    if data is not None and not isinstance(data, dict):
        return "data must be a JSON object"
    invalid = sorted(name for name in event if not _EXTENSION.match(name))
    if invalid:
        return f"attribute name(s) {', '.join(invalid)} are not CloudEvents attribute names"
    return None


# --- the read side (openmeter 1.0.0b236: ``events.list``, ``IngestedEvent``) ----------------
MAX_LISTED = 100  # limit: default 100, at most 100 (OpenMeter's API spec as remembered; unconfirmed)
VALIDATION_ERROR = "no meter matches event type {type!r} (sandbox fault invalid-after-ack)"


def read_route(method: str, path: str, headers: t.Mapping[str, str], sandbox: t.Any) -> Reader | None:
    """``GET /api/v1/events``: the ingested events, newest first, else None."""
    if method != "GET" or path != INGEST_PATH:
        return None

    def listed(query: t.Mapping[str, list[str]], body: bytes) -> Reply:
        authenticate(headers, sandbox.settings)
        return _list(query, sandbox)

    return listed


def _list(query: t.Mapping[str, list[str]], sandbox: t.Any) -> Reply:
    """Filters: ``from``/``to`` on the event's time (inclusive; ``from`` defaults to 72 hours
    ago), ``ingestedAtFrom``/``ingestedAtTo``, ``id`` and ``subject`` (partial match),
    ``customerId`` (the sandbox knows no customers: nothing matches), ``limit``."""
    now = dt.datetime.now(dt.timezone.utc)
    try:
        bounds = {
            name: parse_time(value)
            for name in ("from", "to", "ingestedAtFrom", "ingestedAtTo")
            if (value := first(query, name))
        }
        limit = int(first(query, "limit") or MAX_LISTED)
    except ValueError as exc:
        raise _problem(400, "Bad Request", f"invalid query parameter: {exc}") from None
    if not 1 <= limit <= MAX_LISTED:
        raise _problem(400, "Bad Request", f"limit must be 1 to {MAX_LISTED}")
    low, high = bounds.get("from", now - dt.timedelta(hours=72)), bounds.get("to")
    wanted_id, subject = first(query, "id"), first(query, "subject")
    if many(query, "customerId"):
        return answer(200, [])
    found = []
    with sandbox.lock:
        items = list(sandbox.stores[NAME].scan())
    for item in items:
        event = decode(item.raw)
        moment = item_time(event.get("time"), item.received_at)
        received = dt.datetime.fromtimestamp(item.received_at, dt.timezone.utc)
        if moment < low or (high is not None and moment > high):
            continue
        if "ingestedAtFrom" in bounds and received < bounds["ingestedAtFrom"]:
            continue
        if "ingestedAtTo" in bounds and received > bounds["ingestedAtTo"]:
            continue
        if (wanted_id and wanted_id not in event["id"]) or (subject and subject not in event["subject"]):
            continue
        entry = {"event": event, "ingestedAt": iso(received), "storedAt": iso(received)}
        if item.invalid:
            entry["validationError"] = VALIDATION_ERROR.format(type=event["type"])
        found.append((moment, entry))
    found.sort(key=lambda pair: pair[0], reverse=True)
    return answer(200, [entry for _moment, entry in found[:limit]])
