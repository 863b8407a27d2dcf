"""Stripe's meter event stream, as the sandbox enforces it (served under /stripe).

Confirmed against stripe 16.1.0 (``MeterEventSession``, ``MeterEventStreamCreateParams``):
``POST /v2/billing/meter_event_session`` with the secret key (Bearer) answers a
``v2.billing.meter_event_session`` with an ``authentication_token`` and ``expires_at``
(15 minutes; ``--stripe-session-seconds``); ``POST /v2/billing/meter_event_stream``
with that token takes ``{"events": [...]}`` of 1 to 100 ``{event_name, identifier?,
timestamp?, payload}`` (payload: strings, holding ``stripe_customer_id`` and a numeric
``value``; timestamp within 35 days back and 5 minutes ahead). An expired or unknown
session is 401 (type ``temporary_session_expired``, which the SDK raises as
TemporarySessionExpiredError); a malformed request 400 in
Stripe's error format; de-duplication by ``identifier``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import re
import secrets
import threading
import time
import typing as t

import msgspec

from target_usage_billing.sandbox.readside import Reader, answer, decode, first, iso, item_time, many
from target_usage_billing.sandbox.replies import Reply, json_reply

NAME = "stripe"
PREFIX = "/stripe"
INGEST_PATH = "/v2/billing/meter_event_stream"
SESSION_PATH = "/v2/billing/meter_event_session"
ID_FIELD = "identifier"
MAX_EVENTS = 100
MAX_AGE = dt.timedelta(days=35)
MAX_AHEAD = dt.timedelta(minutes=5)
_NUMBER = re.compile(r"-?\d+(\.\d+)?\Z")

_body_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_events_decoder = msgspec.json.Decoder(list[msgspec.Raw])
# sessions issued: token -> monotonic expiry (the sandbox is one process)
_sessions: dict[str, float] = {}
_sessions_lock = threading.Lock()


def _error(status: int, message: str, code: str | None = None, kind: str = "invalid_request_error") -> Reply:
    error: dict[str, t.Any] = {"type": kind, "message": message}
    if code:
        error["code"] = code
    return json_reply(status, {"error": error})


def authenticate(headers: t.Mapping[str, str], settings: t.Any) -> None:
    """The stream's credential: a live meter event session token."""
    header = headers.get("Authorization", "")
    token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else ""
    with _sessions_lock:
        expiry = _sessions.get(token)
    if expiry is None or time.monotonic() >= expiry:
        # the type Stripe's SDK raises as TemporarySessionExpiredError
        message = "The meter event session has expired or is not valid."
        raise _error(401, message, "billing_meter_event_session_expired", kind="temporary_session_expired")


def expire_sessions() -> int:
    """Every session issued so far expires now; how many there were."""
    with _sessions_lock:
        for token in _sessions:
            _sessions[token] = 0.0
        return len(_sessions)


def session_tokens() -> list[str]:
    with _sessions_lock:
        return list(_sessions)


def forget_sessions() -> None:
    with _sessions_lock:
        _sessions.clear()


def items(body: bytes, query: t.Mapping[str, list[str]], settings: t.Any) -> list[tuple[str | None, bytes]]:
    """(identifier, raw event) of a valid request; a 400 Reply otherwise."""
    try:
        raw_events = _events_decoder.decode(_body_decoder.decode(body)["events"])
        events = [msgspec.json.decode(raw) for raw in raw_events]
    except KeyError:
        raise _error(400, "events is required") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _error(400, f"body is not valid: {exc}") from None
    if not 1 <= len(events) <= MAX_EVENTS:
        raise _error(400, f"events: send 1 to {MAX_EVENTS} events, got {len(events)}")
    now = dt.datetime.now(dt.timezone.utc)
    out: list[tuple[str | None, bytes]] = []
    for index, (event, raw) in enumerate(zip(events, raw_events)):
        problem = _event_problem(event, now)
        if problem:
            raise _error(400, f"events[{index}].{problem}")
        out.append((event.get("identifier"), bytes(raw)))
    return out


def refusal(index: int, item_id: str | None, reason: str) -> Reply:
    return _error(400, f"events[{index}]: {reason}")


def accepted(new: list[str], duplicate: list[str], query: t.Mapping[str, list[str]]) -> Reply:
    return json_reply(200, {})


def other_route(method: str, path: str, headers: t.Mapping[str, str], settings: t.Any) -> Reply | None:
    """``POST /v2/billing/meter_event_session`` (with the secret key), else None."""
    if method == "POST" and path == SESSION_PATH:
        if headers.get("Authorization") != f"Bearer {settings.stripe_api_key}":
            return json_reply(
                401, {"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}}
            )
        token = "mes_tok_" + secrets.token_urlsafe(24)
        lifetime = settings.stripe_session_seconds
        with _sessions_lock:
            _sessions[token] = time.monotonic() + lifetime
        now = dt.datetime.now(dt.timezone.utc)
        return json_reply(
            200,
            {
                "object": "v2.billing.meter_event_session",
                "id": "mes_" + secrets.token_hex(8),
                "authentication_token": token,
                "created": now.isoformat().replace("+00:00", "Z"),
                "expires_at": (now + dt.timedelta(seconds=lifetime)).isoformat().replace("+00:00", "Z"),
                "livemode": False,
            },
        )
    return None


def _event_problem(event: t.Any, now: dt.datetime) -> str | None:
    if not isinstance(event, dict):
        return ": an event must be an object"
    unknown = sorted(set(event) - {"event_name", "identifier", "timestamp", "payload"})
    if unknown:
        return f"{unknown[0]}: unknown parameter"
    name = event.get("event_name")
    if not isinstance(name, str) or not name:
        return "event_name: required"
    identifier = event.get("identifier")
    if identifier is not None and (not isinstance(identifier, str) or not identifier):
        return "identifier: must be a non-empty string"
    payload = event.get("payload")
    if not isinstance(payload, dict) or not all(isinstance(v, str) for v in payload.values()):
        return "payload: must be an object of strings"
    if not payload.get("stripe_customer_id"):
        return "payload.stripe_customer_id: required"
    if not _NUMBER.match(payload.get("value", "")):
        return "payload.value: must be a number written as a string"
    stamp = event.get("timestamp")
    if stamp is not None:
        try:
            moment = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        except ValueError:
            return f"timestamp: {stamp!r} is not a valid timestamp"
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        if moment < now - MAX_AGE:
            return "timestamp: must be within the past 35 days"
        if moment > now + MAX_AHEAD:
            return "timestamp: must be at most 5 minutes in the future"
    return None


# --- the read side (stripe 16.1.0: ``billing.meters``, ``meters.event_summaries``,
# ``v2.core.events``) ----------------------------------------------------------------------
# The sandbox has a meter for every event_name it has stored (sum of payload "value" per
# payload "stripe_customer_id"). An event reported invalid after the acknowledgement
# (fault invalid-after-ack) is not summed and is reported by a thin event
# v1.billing.meter.error_report_triggered, which stripe 16.x lists with
# ``client.v2.core.events.list`` (GET /v2/core/events) and parses as
# V1BillingMeterErrorReportTriggeredEvent; its v1 Event type knows no meter error events.
ERROR_CODE = "meter_event_customer_not_found"
ERROR_MESSAGE = "Customer {customer!r} was not found (sandbox fault invalid-after-ack)."


def read_route(method: str, path: str, headers: t.Mapping[str, str], sandbox: t.Any) -> Reader | None:
    """The meters, their event summaries and the meter error events, else None."""
    parts = path.strip("/").split("/")
    reader: Reader | None = None
    if method == "GET" and parts[:3] == ["v1", "billing", "meters"]:
        if len(parts) == 3:
            reader = lambda query, body: _list(path, _meters(sandbox), query)  # noqa: E731
        elif len(parts) == 4:
            reader = lambda query, body: answer(200, _meter(parts[3], sandbox))  # noqa: E731
        elif len(parts) == 5 and parts[4] == "event_summaries":
            reader = lambda query, body: _summaries(path, parts[3], query, sandbox)  # noqa: E731
    elif method == "GET" and parts == ["v2", "core", "events"]:
        reader = lambda query, body: _error_events(query, sandbox)  # noqa: E731
    if reader is None:
        return None
    known_reader = reader

    def authenticated(query: t.Mapping[str, list[str]], body: bytes) -> Reply:
        if headers.get("Authorization") != f"Bearer {sandbox.settings.stripe_api_key}":
            raise _error(401, "Invalid API Key provided")
        return known_reader(query, body)

    return authenticated


def _meter_id(event_name: str) -> str:
    return "mtr_test_" + hashlib.blake2b(event_name.encode(), digest_size=12).hexdigest()


def _events(sandbox: t.Any) -> list[tuple[dict[str, t.Any], float, bool]]:
    with sandbox.lock:
        return [(decode(item.raw), item.received_at, item.invalid) for item in sandbox.stores[NAME].scan()]


def _meters(sandbox: t.Any) -> list[dict[str, t.Any]]:
    names = sorted({str(event["event_name"]) for event, _at, _invalid in _events(sandbox)})
    return [
        {
            "id": _meter_id(name),
            "object": "billing.meter",
            "created": 1704824589,
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "default_aggregation": {"formula": "sum"},
            "display_name": name,
            "event_name": name,
            "event_time_window": None,
            "livemode": False,
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "updated": 1704824589,
            "value_settings": {"event_payload_key": "value"},
        }
        for name in names
    ]


def _meter(meter_id: str, sandbox: t.Any) -> dict[str, t.Any]:
    for meter in _meters(sandbox):
        if meter["id"] == meter_id:
            return meter
    raise _error(404, f"No such billing meter: '{meter_id}'", "resource_missing")


def _list(url: str, data: list[dict[str, t.Any]], query: t.Mapping[str, list[str]]) -> Reply:
    """A v1 list page: ``limit`` (1 to 100, default 10) and ``starting_after`` an id."""
    try:
        limit = int(first(query, "limit") or 10)
    except ValueError:
        raise _error(400, "limit must be a whole number") from None
    if not 1 <= limit <= 100:
        raise _error(400, "limit must be between 1 and 100")
    after = first(query, "starting_after")
    if after:
        ids = [item["id"] for item in data]
        data = data[ids.index(after) + 1 :] if after in ids else []
    return answer(200, {"object": "list", "url": url, "has_more": len(data) > limit, "data": data[:limit]})


def _summaries(url: str, meter_id: str, query: t.Mapping[str, list[str]], sandbox: t.Any) -> Reply:
    """Sums of payload "value" of one customer's valid events in [start_time, end_time), in
    one summary or per ``value_grouping_window`` (hour, day), newest first (as in Stripe's
    documented example answer)."""
    meter = _meter(meter_id, sandbox)
    customer = first(query, "customer")
    if not customer:
        raise _error(400, "Missing required param: customer.", "parameter_missing")
    try:
        start, end = int(first(query, "start_time") or ""), int(first(query, "end_time") or "")
    except ValueError:
        raise _error(400, "start_time and end_time are required timestamps", "parameter_missing") from None
    window = first(query, "value_grouping_window")
    step = {None: end - start, "hour": 3600, "day": 86400}.get(window)
    if step is None:
        raise _error(400, "value_grouping_window must be hour or day")
    if start % 60 or end % 60 or start >= end or (window and (start % step or end % step)):
        raise _error(
            400, "start_time and end_time must be aligned (minutes, or the grouping window) and ordered"
        )
    sums = [decimal.Decimal(0) for _ in range(start, end, step)]
    for event, received_at, invalid in _events(sandbox):
        payload = event.get("payload") or {}
        if (
            invalid
            or event["event_name"] != meter["event_name"]
            or payload.get("stripe_customer_id") != customer
        ):
            continue
        moment = item_time(event.get("timestamp"), received_at).timestamp()
        if start <= moment < end:
            sums[int((moment - start) // step)] += decimal.Decimal(payload["value"])
    summaries = []
    for number, total in enumerate(sums):
        low = start + number * step
        key = f"{meter_id}:{customer}:{low}:{low + step}"
        summaries.append(
            {
                "id": "mtrusg_test_" + hashlib.blake2b(key.encode(), digest_size=16).hexdigest(),
                "object": "billing.meter_event_summary",
                "aggregated_value": total,
                "end_time": low + step,
                "livemode": False,
                "meter": meter_id,
                "start_time": low,
            }
        )
    return _list(url, summaries[::-1], query)


def _error_events(query: t.Mapping[str, list[str]], sandbox: t.Any) -> Reply:
    """One v1.billing.meter.error_report_triggered event per meter and ingest request that
    had events reported invalid, every one of them among its sample errors, newest first.
    Filters: ``object_id`` (a meter id), ``types``; ``limit`` (default 20)."""
    reports: dict[tuple[float, str], list[dict[str, t.Any]]] = {}
    for event, received_at, invalid in _events(sandbox):
        if invalid:
            reports.setdefault((received_at, str(event["event_name"])), []).append(event)
    object_id, types = first(query, "object_id"), many(query, "types")
    found = []
    for (received_at, name), events in sorted(reports.items(), reverse=True):
        meter_id = _meter_id(name)
        kind = "v1.billing.meter.error_report_triggered"
        if (object_id and object_id != meter_id) or (types and kind not in types):
            continue
        samples = [
            {
                "error_message": ERROR_MESSAGE.format(
                    customer=(e.get("payload") or {}).get("stripe_customer_id")
                ),
                "request": {"identifier": e.get("identifier")},
            }
            for e in events
        ]
        count = len(events)
        found.append(
            {
                "id": "evt_test_"
                + hashlib.blake2b(f"{received_at}:{name}".encode(), digest_size=16).hexdigest(),
                "object": "v2.core.event",
                "type": kind,
                "created": iso(received_at),
                "livemode": False,
                "context": None,
                "reason": None,
                "related_object": {
                    "id": meter_id,
                    "type": "billing.meter",
                    "url": f"/v1/billing/meters/{meter_id}",
                },
                "data": {
                    "developer_message_summary": _summary_message(count),
                    "reason": {
                        "error_count": count,
                        "error_types": [{"code": ERROR_CODE, "error_count": count, "sample_errors": samples}],
                    },
                    "validation_start": iso(received_at),
                    "validation_end": iso(received_at + 1),
                },
            }
        )
    try:
        limit = max(1, min(int(first(query, "limit") or 20), 100))
    except ValueError:
        raise _error(400, "limit must be a whole number") from None
    return answer(200, {"data": found[:limit], "next_page_url": None, "previous_page_url": None})


def _summary_message(count: int) -> str:
    return "There is 1 invalid event" if count == 1 else f"There are {count} invalid events"
