"""Orb's ingest contract, as the sandbox enforces it (served under /orb).

Confirmed against orb-billing 4.90.0 (``EventIngestParams``, ``events.ingest`` and its
documentation): ``POST /v1/ingest`` with a Bearer API key and ``{"events": [...]}``;
each event needs ``event_name``, ``idempotency_key``, ``timestamp`` (ISO 8601, UTC) and
``properties`` (flat: numbers, booleans, strings), and exactly one of ``customer_id`` and
``external_customer_id``; at most 5 minutes ahead, no older than the account's grace
period (12 hours unless agreed otherwise); ``idempotency_key`` is ingested at most once,
and two events sharing one with different bodies fail the whole request. A request
with an invalid event ingests nothing and answers 400 with
``{"validation_failed": [{"idempotency_key", "validation_errors"}]}``; a valid one 200
with an empty list, plus ``debug: {duplicate, ingested}`` when ``?debug=true`` (an older
API option the current SDK no longer exposes). Orb publishes no per-request limit; the
sandbox takes 500 events, the batch size Orb's own integrations use.
"""

from __future__ import annotations

import datetime as dt
import typing as t

import msgspec
from msgspec import Meta, Struct

from target_usage_billing.sandbox import orb_backfills
from target_usage_billing.sandbox.readside import Reader, answer, decode, first, iso, parse_time
from target_usage_billing.sandbox.replies import Reply, json_reply

NAME = "orb"
PREFIX = "/orb"
INGEST_PATH = "/v1/ingest"
ID_FIELD = "idempotency_key"
MAX_EVENTS = 500
MAX_AHEAD = dt.timedelta(minutes=5)
UTC = dt.timezone.utc

NonEmpty = t.Annotated[str, Meta(min_length=1)]
Scalar = t.Union[str, int, float, bool]  # noqa: UP007 - msgspec reads the Union at run time


class OrbEvent(Struct, forbid_unknown_fields=True):
    event_name: NonEmpty
    idempotency_key: NonEmpty
    timestamp: str
    properties: dict[str, Scalar]
    customer_id: str | None = None
    external_customer_id: str | None = None


class IngestBody(Struct, forbid_unknown_fields=True):
    events: list[msgspec.Raw]


_body_decoder = msgspec.json.Decoder(IngestBody)
_event_decoder = msgspec.json.Decoder(OrbEvent)


# Orb's error documents: the "type" URL is what its SDK maps to an error class.
_ERROR_TYPES = {
    400: "https://docs.withorb.com/reference/error-responses#400-request-validation-errors",
    401: "https://docs.withorb.com/reference/error-responses#401-authentication-error",
}


def _error(status: int, title: str, detail: str, **extra: t.Any) -> Reply:
    document = {"type": _ERROR_TYPES[status], "status": status, "title": title, "detail": detail, **extra}
    return json_reply(status, document)


def authenticate(headers: t.Mapping[str, str], settings: t.Any) -> None:
    if headers.get("Authorization") != f"Bearer {settings.orb_api_key}":
        raise _error(401, "Authentication error", "invalid or missing API key")


def items(body: bytes, query: t.Mapping[str, list[str]], settings: t.Any) -> list[tuple[str | None, bytes]]:
    """(idempotency_key, raw event) of a valid request; a Reply in Orb's format otherwise."""
    try:
        events = _body_decoder.decode(body).events
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _error(400, "Request validation error", f"body must be {{'events': [...]}}: {exc}") from None
    if not 1 <= len(events) <= MAX_EVENTS:
        raise _error(400, "Request validation error", f"send 1 to {MAX_EVENTS} events, got {len(events)}")
    now = dt.datetime.now(UTC)
    oldest, latest = now - dt.timedelta(hours=settings.orb_grace_period_hours), now + MAX_AHEAD
    if query.get("backfill_id"):  # older usage goes into a backfill (orb_backfills.ingest)
        oldest = dt.datetime.min.replace(tzinfo=UTC)
    failed: list[dict[str, t.Any]] = []
    out: list[tuple[str | None, bytes]] = []
    seen: dict[str, bytes] = {}
    for index, raw in enumerate(events):
        try:
            event = _event_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            key = _key_of(raw)
            failed.append({"idempotency_key": key or f"events[{index}]", "validation_errors": [str(exc)]})
            continue
        errors = _event_errors(event, oldest, latest)
        if errors:
            failed.append({"idempotency_key": event.idempotency_key, "validation_errors": errors})
            continue
        first = seen.setdefault(event.idempotency_key, bytes(raw))
        if first != bytes(raw):
            raise _error(
                400,
                "Request validation error",
                f"idempotency_key {event.idempotency_key!r} appears twice with different bodies",
            )
        out.append((event.idempotency_key, bytes(raw)))
    if failed:
        raise _error(400, "Request validation error", "events failed validation", validation_failed=failed)
    return out


def refusal(index: int, item_id: str | None, reason: str) -> Reply:
    failed = [{"idempotency_key": item_id, "validation_errors": [reason]}]
    return _error(400, "Request validation error", "events failed validation", validation_failed=failed)


def accepted(new: list[str], duplicate: list[str], query: t.Mapping[str, list[str]]) -> Reply:
    document: dict[str, t.Any] = {"validation_failed": []}
    if query.get("debug", [""])[0].lower() == "true":
        document["debug"] = {"duplicate": duplicate, "ingested": new}
    return json_reply(200, document)


def divert(
    query: t.Mapping[str, list[str]], items: list[tuple[str | None, bytes]], sandbox: t.Any
) -> Reply | None:
    """The answer to an ingest into a backfill (its events wait in it until it is
    closed; called with the lock held), or None for a live ingest."""
    if not query.get("backfill_id"):
        return None
    return orb_backfills.ingest(query, items, sandbox)


def sandbox_route(
    method: str, path: str, headers: t.Mapping[str, str], body: bytes, sandbox: t.Any
) -> Reply | None:
    """The backfill endpoints (sandbox/orb_backfills.py), else None."""
    if not path.startswith(orb_backfills.PATH):
        return None
    authenticate(headers, sandbox.settings)
    return orb_backfills.route(method, path, body, sandbox, headers.get("Idempotency-Key"))


def other_route(method: str, path: str, headers: t.Mapping[str, str], settings: t.Any) -> Reply | None:
    """``GET /v1/customers`` (the target's credentials probe), else None."""
    if method == "GET" and path == "/v1/customers":
        authenticate(headers, settings)
        return json_reply(200, {"data": [], "pagination_metadata": {"has_more": False, "next_cursor": None}})
    return None


def _event_errors(event: OrbEvent, oldest: dt.datetime, latest: dt.datetime) -> list[str]:
    errors = []
    if (event.customer_id is None) == (event.external_customer_id is None):
        errors.append("exactly one of customer_id and external_customer_id must be given")
    try:
        moment = _utc(event.timestamp)
    except ValueError:
        errors.append(f"timestamp {event.timestamp!r} is not an ISO 8601 UTC date-time")
    else:
        if moment < oldest:
            errors.append(
                f"timestamp {event.timestamp} is older than the ingestion grace period: "
                "ingest it into a backfill (POST /v1/events/backfills, then ?backfill_id=)"
            )
        elif moment > latest:
            errors.append(f"timestamp {event.timestamp} is more than 5 minutes in the future")
    return errors


def _utc(text: str) -> dt.datetime:
    if "T" not in text:
        raise ValueError(text)
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is not None and moment.utcoffset() != dt.timedelta(0):
        raise ValueError("not UTC")  # Orb: "sent in UTC timezone (no timezone offset)"
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _key_of(raw: msgspec.Raw) -> str | None:
    try:
        key = msgspec.json.decode(raw).get("idempotency_key")
    except (msgspec.DecodeError, AttributeError):
        return None
    return key if isinstance(key, str) else None


# --- the read side (orb-billing 4.90.0: ``events.search``, ``events.volume.list``) ---------
# Orb validates in the request, so nothing is reported invalid after its 200: the fault
# invalid-after-ack does not apply to Orb (lost-after-ack does).


def read_route(method: str, path: str, headers: t.Mapping[str, str], sandbox: t.Any) -> Reader | None:
    """``POST /v1/events/search`` and ``GET /v1/events/volume``, else None."""
    readers: dict[tuple[str, str], Reader] = {
        ("POST", "/v1/events/search"): lambda query, body: _search(body, sandbox),
        ("GET", "/v1/events/volume"): lambda query, body: _volume(query, sandbox),
    }
    reader = readers.get((method, path))
    if reader is None:
        return None

    def authenticated(query: t.Mapping[str, list[str]], body: bytes) -> Reply:
        authenticate(headers, sandbox.settings)
        return reader(query, body)

    return authenticated


def _timeframe(start: t.Any, end: t.Any, default_start: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
    try:
        now = dt.datetime.now(UTC)
        return (
            parse_time(start) if start else now - default_start,
            parse_time(end) if end else now,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise _error(400, "Request validation error", f"invalid timeframe: {exc}") from None


def _search(body: bytes, sandbox: t.Any) -> Reply:
    """The events with these ids whose timestamp is in the timeframe (default: the last week)."""
    try:
        request = msgspec.json.decode(body or b"{}")
        ids = request["event_ids"]
        assert isinstance(ids, list) and all(isinstance(i, str) for i in ids)
    except (KeyError, AssertionError, msgspec.DecodeError, TypeError):
        raise _error(400, "Request validation error", "event_ids must be a list of strings") from None
    start, end = _timeframe(
        request.get("timeframe_start"), request.get("timeframe_end"), dt.timedelta(days=7)
    )
    found = []
    for key in dict.fromkeys(ids):
        with sandbox.lock:
            item = sandbox.stores[NAME].get(key)
        if item is None:
            continue
        event = decode(item.raw)
        if not start <= parse_time(event["timestamp"]) < end:
            continue
        found.append(
            {
                "id": key,
                "customer_id": event.get("customer_id"),
                "external_customer_id": event.get("external_customer_id"),
                "deprecated": False,
                "event_name": event["event_name"],
                "properties": event["properties"],
                "timestamp": event["timestamp"],
            }
        )
    return answer(200, {"data": found})


def _volume(query: t.Mapping[str, list[str]], sandbox: t.Any) -> Reply:
    """Counts of stored events per UTC hour of their timestamp (hours without events are not
    listed), oldest first; ``limit`` (default 20) and ``cursor`` page through them."""
    if not first(query, "timeframe_start"):
        raise _error(400, "Request validation error", "timeframe_start is required")
    start, end = _timeframe(first(query, "timeframe_start"), first(query, "timeframe_end"), dt.timedelta(0))
    start = start.replace(minute=0, second=0, microsecond=0)  # the hour the time falls in
    if end.replace(minute=0, second=0, microsecond=0) != end:
        end = end.replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=1)
    hours: dict[dt.datetime, int] = {}
    with sandbox.lock:
        for item in sandbox.stores[NAME].scan():
            moment = parse_time(decode(item.raw)["timestamp"])
            if start <= moment < end:
                hour = moment.replace(minute=0, second=0, microsecond=0)
                hours[hour] = hours.get(hour, 0) + 1
    try:
        limit = max(1, min(int(first(query, "limit") or 20), 500))
        offset = int(first(query, "cursor") or 0)
    except ValueError:
        raise _error(400, "Request validation error", "limit and cursor must be whole numbers") from None
    rows = [
        {
            "count": hours[hour],
            "timeframe_start": iso(hour, millis=False),
            "timeframe_end": iso(hour + dt.timedelta(hours=1), millis=False),
        }
        for hour in sorted(hours)
    ]
    more = offset + limit < len(rows)
    pagination = {"has_more": more, "next_cursor": str(offset + limit) if more else None}
    return answer(200, {"data": rows[offset : offset + limit], "pagination_metadata": pagination})
