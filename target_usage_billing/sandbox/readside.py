"""Helpers the platforms' read endpoints share: times, exact decimals, stable ids."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import typing as t
import uuid

import msgspec

from target_usage_billing.sandbox.replies import Reply

UTC = dt.timezone.utc
# a client reads back what it was told to read, as a query string and a body
Reader = t.Callable[[t.Mapping[str, list[str]], bytes], Reply]
_NAMESPACE = uuid.UUID("5b0c8f1e-3f5e-4d0e-9a53-5a6d1b7e0c42")
# sums of exact decimals leave as JSON numbers with every digit
_encoder = msgspec.json.Encoder(decimal_format="number")


def answer(status: int, document: t.Any, content_type: str = "application/json") -> Reply:
    return Reply(status, _encoder.encode(document), {"Content-Type": content_type})


def decode(raw: bytes) -> dict[str, t.Any]:
    """A stored item, its numbers as exact decimals."""
    document = json.loads(raw, parse_float=decimal.Decimal)
    return document if isinstance(document, dict) else {}


def stable_id(*parts: str) -> str:
    """The same UUID for the same thing, in every run (ids the sandbox makes up)."""
    return str(uuid.uuid5(_NAMESPACE, "\x00".join(parts)))


def iso(moment: float | dt.datetime, *, millis: bool = True) -> str:
    if not isinstance(moment, dt.datetime):
        moment = dt.datetime.fromtimestamp(moment, UTC)
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{moment.microsecond // 1000:03d}Z" if millis else f"{text}Z"


def parse_time(text: str) -> dt.datetime:
    """An RFC 3339 / ISO 8601 date-time (no offset: UTC); ValueError otherwise."""
    text = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    head, sep, rest = text.partition(".")
    if sep:  # Python parses at most 6 fractional digits
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = head + "." + rest[: min(digits, 6)] + rest[digits:]
    moment = dt.datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def item_time(value: t.Any, default: float) -> dt.datetime:
    """An item's own time (ISO text or Unix seconds), else when it was received."""
    if isinstance(value, (int, float, decimal.Decimal)) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(float(value), UTC)
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromtimestamp(float(value), UTC)
        except ValueError:
            pass
        try:
            return parse_time(value)
        except ValueError:
            pass
    return dt.datetime.fromtimestamp(default, UTC)


def first(query: t.Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def many(query: t.Mapping[str, list[str]], name: str, *, comma: bool = False) -> list[str]:
    """A list parameter however the SDK writes it: repeated, name[] or name[N], or (m3ter's
    SDK) comma-separated."""
    found: list[str] = []
    for key, values in query.items():
        if (
            key == name
            or key == f"{name}[]"
            or (key.startswith(f"{name}[") and key[len(name) + 1 : -1].isdigit())
        ):
            for value in values:
                found += [part for part in value.split(",") if part] if comma else [value]
    return found
