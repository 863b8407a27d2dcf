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
import re
import secrets
import threading
import time
import typing as t

import msgspec

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
