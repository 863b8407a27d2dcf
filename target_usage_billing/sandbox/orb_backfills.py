"""Orb's backfill flow, as the sandbox emulates it (served under /orb with sandbox/orb.py).

Confirmed against orb-billing 4.90.0 (``events.backfills``: ``BackfillCreateParams`` and the
``Backfill*Response`` types, and the documentation of ``create``, ``close`` and ``revert``):

- ``POST /v1/events/backfills`` ``{timeframe_start, timeframe_end, customer_id |
  external_customer_id?, replace_existing_events?, close_time?}`` creates a ``pending``
  backfill: at most 31 days long, and not overlapping another pending backfill of the same
  customer (or an account-wide one).
- ``POST /v1/ingest?backfill_id=ID`` ingests events into it: older than the grace period
  is allowed, but each event must fall in its timeframe and belong to its customer.
  Nothing of it is reflected (visible, billed) before the close.
- ``POST /v1/events/backfills/{id}/close``: the events are reflected (``reflected``; the
  sandbox reflects at once). With ``replace_existing_events``, the customer's events
  already stored in the timeframe are replaced; otherwise an idempotency key already
  stored is not ingested again.
- ``POST /v1/events/backfills/{id}/revert``: a pending backfill is dropped, a reflected one
  undone (``reverted``).
- ``GET /v1/events/backfills[/{id}]`` lists (newest first) or fetches them.
"""

from __future__ import annotations

import datetime as dt
import itertools
import typing as t

import msgspec

from target_usage_billing.sandbox.readside import answer, decode, iso, parse_time
from target_usage_billing.sandbox.replies import Reply, json_reply

PATH = "/v1/events/backfills"
MAX_DAYS = 31
UTC = dt.timezone.utc
_numbers = itertools.count(1)


class CreateBody(msgspec.Struct, forbid_unknown_fields=True):
    """``BackfillCreateParams``: nothing else is taken."""

    timeframe_start: str
    timeframe_end: str
    close_time: str | None = None
    customer_id: str | None = None
    deprecation_filter: str | None = None
    external_customer_id: str | None = None
    replace_existing_events: bool = False


_create_decoder = msgspec.json.Decoder(CreateBody)


def _error(status: int, detail: str) -> Reply:
    kinds = {400: "400-request-validation-errors", 404: "404-resource-not-found"}
    title = {400: "Request validation error", 404: "Resource not found"}[status]
    document = {
        "type": f"https://docs.withorb.com/reference/error-responses#{kinds[status]}",
        "status": status,
        "title": title,
        "detail": detail,
    }
    return json_reply(status, document)


class Backfill:
    def __init__(self, start: dt.datetime, end: dt.datetime, customer: tuple[str, str] | None, replace: bool):
        self.id = f"bf_{next(_numbers):06d}"
        self.start, self.end = start, end
        self.customer = customer  # ("customer_id" | "external_customer_id", value), None: all
        self.replace = replace
        self.status = "pending"
        now = dt.datetime.now(UTC)
        self.created_at = now
        self.close_time: dt.datetime | None = now + dt.timedelta(days=1)
        self.reverted_at: dt.datetime | None = None
        self.events: dict[str, bytes] = {}  # idempotency key -> event, until reflected
        self.reflected: list[str] = []  # keys it stored
        self.replaced: list[bytes] = []  # events it replaced (put back by a revert)

    def document(self) -> dict[str, t.Any]:
        value = self.customer[1] if self.customer else None
        return {
            "id": self.id,
            "close_time": iso(self.close_time) if self.close_time else None,
            "created_at": iso(self.created_at),
            # Orb answers its own customer id; the sandbox has none, so the external one
            "customer_id": value,
            "events_ingested": len(self.events) + len(self.reflected),
            "replace_existing_events": self.replace,
            "reverted_at": iso(self.reverted_at) if self.reverted_at else None,
            "status": self.status,
            "timeframe_end": iso(self.end),
            "timeframe_start": iso(self.start),
            "deprecation_filter": None,
        }

    def covers(self, event: dict[str, t.Any]) -> str | None:
        """Why ``event`` cannot be part of this backfill, or None."""
        moment = parse_time(event["timestamp"])
        if not self.start <= moment < self.end:
            return (
                f"timestamp {event['timestamp']} is outside backfill {self.id}'s timeframe "
                f"[{iso(self.start)}, {iso(self.end)})"
            )
        if self.customer is not None and event.get(self.customer[0]) != self.customer[1]:
            return f"backfill {self.id} is scoped to {self.customer[0]} {self.customer[1]!r}"
        return None


def backfills(sandbox: t.Any) -> dict[str, Backfill]:
    found = getattr(sandbox, "orb_backfills", None)
    if found is None:
        found = sandbox.orb_backfills = {}
    return t.cast(dict[str, Backfill], found)


def route(
    method: str, path: str, body: bytes, sandbox: t.Any, idempotency_key: str | None = None
) -> Reply | None:
    """The backfill endpoints (authenticated by the caller), else None. A create with an
    ``Idempotency-Key`` Orb has seen gets the first answer again (as Orb's API does)."""
    if not path.startswith(PATH):
        return None
    rest = path[len(PATH) :].strip("/")
    with sandbox.lock:
        known = backfills(sandbox)
        if method == "POST" and not rest:
            answered = sandbox.orb_backfills_by_key.get(idempotency_key) if idempotency_key else None
            if answered is not None:
                return answer(200, known[answered].document())
            reply = _create(body, known, sandbox)
            if idempotency_key and reply.status == 200:
                sandbox.orb_backfills_by_key[idempotency_key] = max(known)
            return reply
        if method == "GET" and not rest:
            listed = sorted(known.values(), key=lambda b: b.id, reverse=True)
            meta = {"has_more": False, "next_cursor": None}
            return answer(200, {"data": [b.document() for b in listed], "pagination_metadata": meta})
        backfill_id, _, action = rest.partition("/")
        backfill = known.get(backfill_id)
        if backfill is None:
            return _error(404, f"no backfill {backfill_id!r}")
        if method == "GET" and not action:
            return answer(200, backfill.document())
        if method == "POST" and action == "close":
            return _close(backfill, sandbox)
        if method == "POST" and action == "revert":
            return _revert(backfill, sandbox)
    return None


def _create(body: bytes, known: dict[str, Backfill], sandbox: t.Any) -> Reply:
    try:
        request = _create_decoder.decode(body or b"{}")
        start = parse_time(request.timeframe_start)
        end = parse_time(request.timeframe_end)
    except (TypeError, ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        return _error(400, f"timeframe_start and timeframe_end (ISO 8601) are required: {exc}")
    if not start < end:
        return _error(400, "timeframe_start must be before timeframe_end")
    if end - start > dt.timedelta(days=MAX_DAYS):
        return _error(400, f"a backfill's timeframe is at most {MAX_DAYS} days")
    boundary = dt.datetime.now(UTC) - dt.timedelta(hours=sandbox.settings.orb_grace_period_hours)
    if end > boundary + dt.timedelta(seconds=5) and request.deprecation_filter is None:
        return _error(400, "timeframe_end reaches into the ingestion grace period")
    scopes = [
        (f, getattr(request, f)) for f in ("customer_id", "external_customer_id") if getattr(request, f)
    ]
    if len(scopes) > 1:
        return _error(400, "give customer_id or external_customer_id, not both")
    customer = scopes[0] if scopes else None
    for other in known.values():
        same = other.customer is None or customer is None or other.customer == customer
        if other.status in ("pending", "pending_revert") and same and start < other.end and other.start < end:
            return _error(400, f"the timeframe overlaps backfill {other.id}, which is {other.status}")
    backfill = Backfill(start, end, customer, request.replace_existing_events)
    known[backfill.id] = backfill
    return answer(200, backfill.document())


def ingest(query: t.Mapping[str, list[str]], items: list[tuple[str | None, bytes]], sandbox: t.Any) -> Reply:
    """``POST /v1/ingest?backfill_id=ID`` with valid events (called with the lock held)."""
    backfill_id = query["backfill_id"][0]
    backfill = backfills(sandbox).get(backfill_id)
    if backfill is None:
        return _error(404, f"no backfill {backfill_id!r}")
    if backfill.status != "pending":
        return _error(400, f"backfill {backfill_id} is {backfill.status}: it takes no more events")
    failed = []
    for key, raw in items:
        reason = backfill.covers(decode(raw))
        if reason is not None:
            failed.append({"idempotency_key": key, "validation_errors": [reason]})
    if failed:
        document = {
            "type": "https://docs.withorb.com/reference/error-responses#400-request-validation-errors",
            "status": 400,
            "title": "Request validation error",
            "detail": "events failed validation",
            "validation_failed": failed,
        }
        return json_reply(400, document)
    for key, raw in items:
        if key is not None:
            backfill.events.setdefault(key, raw)
    return json_reply(200, {"validation_failed": []})


def _close(backfill: Backfill, sandbox: t.Any) -> Reply:
    if backfill.status != "pending":
        return _error(400, f"backfill {backfill.id} is {backfill.status}, not pending")
    store, stats = sandbox.stores["orb"], sandbox.stats["orb"]
    if backfill.replace:

        def replaced(raw: bytes) -> bool:
            return backfill.covers(decode(raw)) is None

        backfill.replaced = store.discard(replaced)
    items = [(key, raw) for key, raw in backfill.events.items()]
    new_ids, _known = store.add(items, stats)
    backfill.reflected = new_ids
    backfill.events = {}
    backfill.status = "reflected"
    backfill.close_time = dt.datetime.now(UTC)
    return answer(200, backfill.document())


def _revert(backfill: Backfill, sandbox: t.Any) -> Reply:
    if backfill.status not in ("pending", "reflected"):
        return _error(400, f"backfill {backfill.id} is {backfill.status}")
    if backfill.status == "reflected":
        store = sandbox.stores["orb"]
        mine = set(backfill.reflected)
        store.discard(lambda raw: decode(raw).get("idempotency_key") in mine)
        if backfill.replaced:
            store.add(
                [(decode(raw).get("idempotency_key"), raw) for raw in backfill.replaced], sandbox.stats["orb"]
            )
    backfill.events = {}
    backfill.status = "reverted"
    backfill.reverted_at = dt.datetime.now(UTC)
    return answer(200, backfill.document())
