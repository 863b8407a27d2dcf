"""The wire contracts the sandbox enforces, as in billing-apis.md.

Items are validated with msgspec Structs (fast, and errors name the exact path); the raw
bytes of accepted items are what the sandbox stores, so exact decimals can be checked.
"""

from __future__ import annotations

import datetime as dt
import re
import typing as t

import msgspec
from msgspec import Meta, Struct

UTC = dt.timezone.utc

NonEmpty = t.Annotated[str, Meta(min_length=1)]
Rfc3339 = t.Annotated[str, Meta(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")]


class Measurement(Struct, forbid_unknown_fields=True):
    # Types and required fields are checked by msgspec in C; timestamps and data-field
    # codes by the code below (msgspec's regex constraints cost 3x the whole decode).
    meter: NonEmpty
    account: NonEmpty
    ts: str
    uid: str | None = None
    ets: str | None = None
    who: dict[str, str] | None = None
    what: dict[str, str] | None = None
    where: dict[str, str] | None = None
    other: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    measure: dict[str, float] | None = None
    cost: dict[str, float] | None = None
    income: dict[str, float] | None = None


CATEGORIES = ("who", "what", "where", "other", "metadata", "measure", "cost", "income")
# ISO 8601 date-time with an offset: m3ter documents "ISO 8601 format" and its own SDK
# sends "+00:00" for a datetime, so any offset is accepted, not only Z.
_ISO_WITH_OFFSET = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)\Z")
_DATA_FIELD_CODE = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]{0,79}\Z")


class MeasurementsBody(Struct, forbid_unknown_fields=True):
    measurements: list[msgspec.Raw]


class Event(Struct, forbid_unknown_fields=True):
    transaction_id: NonEmpty
    customer_id: NonEmpty
    event_type: NonEmpty
    timestamp: Rfc3339
    properties: dict[str, t.Any] | None = None


class ItemError(Exception):
    """One item breaks the contract: the whole request is refused with 400."""


M3TER_MAX_ITEMS = 1000
M3TER_MAX_BODY = 512_000  # the body must be strictly smaller
METRONOME_MAX_ITEMS = 100
METRONOME_MAX_AGE = dt.timedelta(days=34)
METRONOME_MAX_AHEAD = dt.timedelta(hours=24)
CLOCK_SKEW = dt.timedelta(seconds=5)

_measurements_decoder = msgspec.json.Decoder(MeasurementsBody)
_measurement_decoder = msgspec.json.Decoder(Measurement)


class MeasurementList(Struct):
    measurements: list[Measurement]


_measurement_list_decoder = msgspec.json.Decoder(MeasurementList)
_events_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_event_decoder = msgspec.json.Decoder(Event)
_event_list_decoder = msgspec.json.Decoder(list[Event])


def m3ter_items(body: bytes) -> list[tuple[str | None, bytes]]:
    """(uid, raw item) for a valid measurements body; ItemError naming the item otherwise."""
    try:
        envelope = _measurements_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ItemError(f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ItemError(f"body is not valid JSON: {exc}") from None
    count = len(envelope.measurements)
    if not 1 <= count <= M3TER_MAX_ITEMS:
        raise ItemError(f"measurements must hold 1 to {M3TER_MAX_ITEMS} items, got {count}")
    try:  # one pass in C for the whole body; on error, find the item and say which
        items = _measurement_list_decoder.decode(body).measurements
    except (msgspec.ValidationError, msgspec.DecodeError):
        for index, raw in enumerate(envelope.measurements):
            try:
                _measurement_decoder.decode(raw)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise ItemError(f"measurements[{index}]: {exc}") from None
        raise
    latest = (dt.datetime.now(UTC) + CLOCK_SKEW).strftime("%Y-%m-%dT%H:%M:%S")
    latest_moment = dt.datetime.now(UTC) + CLOCK_SKEW
    good_codes: set[str] = set()
    out = []
    for index, (item, raw) in enumerate(zip(items, envelope.measurements)):
        for name in ("ts", "ets"):
            value = getattr(item, name)
            if value is not None:
                _check_m3ter_time(f"measurements[{index}].{name}", value, latest, latest_moment)
        for category in CATEGORIES:
            for code in getattr(item, category) or ():
                if code not in good_codes:
                    if not _DATA_FIELD_CODE.match(code):
                        msg = f"measurements[{index}].{category}: {code!r} is not a valid data-field code"
                        raise ItemError(msg)
                    good_codes.add(code)
        out.append((item.uid, bytes(raw)))
    return out


def _check_m3ter_time(where: str, value: str, latest: str, latest_moment: dt.datetime) -> None:
    """An ISO 8601 date-time with an offset, a real one, not in the future."""
    if not _ISO_WITH_OFFSET.match(value):
        raise ItemError(f"{where}: {value!r} is not an ISO 8601 date-time with an offset")
    try:
        dt.datetime.fromisoformat(value[:19])  # digits in range, a real date
    except ValueError:
        raise ItemError(f"{where}: {value!r} is not a valid time") from None
    if value[-1] == "Z":  # UTC to the second: comparing text compares times
        future = value[:19] > latest
    else:
        moment = dt.datetime.fromisoformat(value[:19] + value[-6:])
        future = moment.replace(microsecond=0) > latest_moment
    if future:
        raise ItemError(f"{where}: {value} is in the future")


def metronome_items(body: bytes) -> list[tuple[str | None, bytes]]:
    """(transaction_id, raw event) for a valid ingest body; ItemError otherwise."""
    try:
        events = _events_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ItemError(f"body must be a JSON array of events: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ItemError(f"body is not valid JSON: {exc}") from None
    if not 1 <= len(events) <= METRONOME_MAX_ITEMS:
        raise ItemError(f"body must hold 1 to {METRONOME_MAX_ITEMS} events, got {len(events)}")
    try:  # one pass in C for the whole body; on error, find the event and say which
        decoded = _event_list_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        for index, raw in enumerate(events):
            try:
                _event_decoder.decode(raw)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise ItemError(f"events[{index}]: {exc}") from None
        raise
    now = dt.datetime.now(UTC)
    oldest, latest = now - METRONOME_MAX_AGE, now + METRONOME_MAX_AHEAD + CLOCK_SKEW
    # canonical UTC times (most clients send these) are compared as text
    oldest_text = oldest.strftime("%Y-%m-%dT%H:%M:%S")
    latest_text = latest.strftime("%Y-%m-%dT%H:%M:%S")
    items: list[tuple[str | None, bytes]] = []
    for index, (event, raw) in enumerate(zip(decoded, events)):
        stamp = event.timestamp
        if stamp[-1] == "Z" and oldest_text < stamp[:19] < latest_text:
            try:
                dt.datetime.fromisoformat(stamp[:19])  # a real date and time
                items.append((event.transaction_id, bytes(raw)))
                continue
            except ValueError:
                raise ItemError(f"events[{index}].timestamp: {stamp!r} is not valid") from None
        try:
            moment = _to_datetime(event.timestamp)
        except ValueError:
            raise ItemError(f"events[{index}].timestamp: {event.timestamp!r} is not valid") from None
        if moment < oldest:
            raise ItemError(f"events[{index}].timestamp: {event.timestamp} is more than 34 days old")
        if moment > latest:
            raise ItemError(f"events[{index}].timestamp: {event.timestamp} is more than 24 hours ahead")
        items.append((event.transaction_id, bytes(raw)))
    return items


def _to_datetime(text: str) -> dt.datetime:
    text = text.replace("Z", "+00:00")
    head, sep, rest = text.partition(".")
    if sep:  # Python parses at most 6 fractional digits
        digits = len(rest) - len(rest.lstrip("0123456789"))
        rest = rest[: min(digits, 6)] + rest[digits:]
        text = head + "." + rest
    moment = dt.datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
