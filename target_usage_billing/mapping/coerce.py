"""Values a record holds, made into what a payload field sends: text, exact numbers,
UTC timestamps, JSON values; each refusal is a ValueError saying why."""

from __future__ import annotations

import datetime as dt
import math
import re
import sys
import typing as t
from collections.abc import Callable, Mapping
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

import msgspec

from target_usage_billing.mapping.spec import FieldKind, FieldSpec

UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
# Epoch numbers at or above this are milliseconds: 1e11 s is the year 5138, 1e11 ms is 1973.
EPOCH_MILLIS_THRESHOLD = 100_000_000_000
# A number whose decimal point sits more than this many digits from its first digit
# (1e200000000, 1e-5000) is refused: written out it would take megabytes, and no usage
# quantity needs it. Checked with Decimal.adjusted(), which costs nothing.
MAX_NUMBER_DIGITS = 1000
_NANOS = re.compile(r"(.*\.\d{6})\d+(.*)\Z")
_NUMERIC = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")

payload_encoder = msgspec.json.Encoder(decimal_format="number")


def describe(value: t.Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    text = repr(value) if not isinstance(value, Decimal) else str(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def format_utc(moment: dt.datetime) -> str:
    """Format an aware UTC datetime as ISO 8601 with Z, keeping ms or us precision."""
    base = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )
    micros = moment.microsecond
    if micros == 0:
        return base + "Z"
    if micros % 1000 == 0:
        return f"{base}.{micros // 1000:03d}Z"
    return f"{base}.{micros:06d}Z"


def _bounded(value: Decimal) -> Decimal:
    """``value`` when its exact text is a sane length, else ValueError."""
    if -MAX_NUMBER_DIGITS < value.adjusted() < MAX_NUMBER_DIGITS:
        return value
    text = str(value)
    raise ValueError(f"number {text[:40]} is out of range (over {MAX_NUMBER_DIGITS} digits written out)")


def _from_epoch(number: Decimal | int | float) -> dt.datetime:
    value = Decimal(repr(number)) if isinstance(number, float) else Decimal(number)
    if value.adjusted() > 16:  # beyond any epoch in seconds or milliseconds
        raise OverflowError
    if abs(value) >= EPOCH_MILLIS_THRESHOLD:
        value = value / 1000
    micros = int((value * 1_000_000).to_integral_value(rounding=ROUND_HALF_EVEN))
    return _EPOCH + dt.timedelta(microseconds=micros)


if sys.version_info >= (3, 11):
    _read_canonical = dt.datetime.fromisoformat  # reads the "Z" itself: no copy without it
else:  # pragma: no cover - Python 3.10 does not read "Z"

    def _read_canonical(value: str) -> dt.datetime:
        return dt.datetime.fromisoformat(value[:-1])


def to_utc_timestamp(value: t.Any) -> str:
    """Normalise a timestamp to UTC ISO 8601 ending in Z.

    Accepts datetime/date objects, ISO 8601 strings with any offset, and epoch seconds or
    milliseconds (numbers or numeric strings). Naive times are taken as UTC.
    Raises ValueError with a reason for anything else.
    """
    if type(value) is str:
        if (
            len(value) in (20, 24, 27)
            and value[-1] == "Z"
            and value[10] == "T"
            and value[4] == value[7] == "-"
            and value[13] == value[16] == ":"
            and (len(value) == 20 or value[19] == ".")
        ):
            try:  # already canonical: only check that the digits make a real time
                _read_canonical(value)
                return value
            except ValueError:
                msg = f"{value!r} is not a valid date and time"
                raise ValueError(msg) from None
        text = value.strip()
        if not text:
            raise ValueError("empty string is not a timestamp")
        if _NUMERIC.match(text):
            return to_utc_timestamp(Decimal(text))
        nanos = _NANOS.match(text)
        if nanos:  # Python parses at most microseconds: drop the nanoseconds
            text = nanos.group(1) + nanos.group(2)
        if text.endswith(("z", "Z")):
            text = text[:-1] + "+00:00"
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            msg = f"{value!r} is not an ISO 8601 timestamp or epoch number"
            raise ValueError(msg) from None
    elif isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, bool) or value is None:
        msg = f"{describe(value)} is not a timestamp"
        raise ValueError(msg)
    elif isinstance(value, (int, float, Decimal)):
        if (isinstance(value, float) and not math.isfinite(value)) or (
            isinstance(value, Decimal) and not value.is_finite()
        ):
            msg = f"{describe(value)} is not a timestamp"
            raise ValueError(msg)
        try:
            moment = _from_epoch(value)
        except (OverflowError, InvalidOperation):
            msg = f"epoch number {value} is out of range"
            raise ValueError(msg) from None
    else:
        msg = f"{describe(value)} is not a timestamp"
        raise ValueError(msg)
    try:
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:
        msg = f"{value!r} is out of range"
        raise ValueError(msg) from None
    return format_utc(moment)


_DAY_SECONDS: dict[str, int] = {}  # "YYYY-MM-DD" -> its midnight in Unix seconds
_DAYS_REMEMBERED = 10_000


def to_unix_seconds(value: t.Any) -> int | str:
    """A timestamp (any form ``to_utc_timestamp`` takes) as seconds since 1970 UTC: an
    int when whole, else the exact decimal text (``"1795184122.25"``).

    Read from the canonical text's fixed places (each day's midnight computed once): a
    datetime and Decimal arithmetic per record were a fifth of a Lago run's CPU."""
    stamp = to_utc_timestamp(value)  # YYYY-MM-DDTHH:MM:SS[.fff|.ffffff]Z, a real time
    day = _DAY_SECONDS.get(stamp[:10])
    if day is None:
        if len(_DAY_SECONDS) >= _DAYS_REMEMBERED:
            _DAY_SECONDS.clear()
        day = _DAY_SECONDS[stamp[:10]] = (dt.date.fromisoformat(stamp[:10]) - _EPOCH.date()).days * 86400
    whole = day + int(stamp[11:13]) * 3600 + int(stamp[14:16]) * 60 + int(stamp[17:19])
    fraction = stamp[20:-1].rstrip("0")
    if not fraction:
        return whole
    if whole >= 0:
        return f"{whole}.{fraction}"
    return str((Decimal(whole) + Decimal(f"0.{fraction}")).normalize())  # before 1970: -0.5, not -1.5


def to_number(value: t.Any) -> int | float | Decimal:
    """A JSON number with the exact decimal value given; raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {describe(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"expected a finite number, got {value}")
        return _bounded(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value}")
        return value
    if isinstance(value, str):
        text = value.strip()
        if _NUMERIC.match(text):
            return _bounded(Decimal(text))
    raise ValueError(f"expected a number, got {describe(value)}")


def to_string(value: t.Any) -> str:
    """A string; numbers and booleans are converted, objects and arrays refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"expected a string, got {value}")
        return format(_bounded(value), "f")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"expected a string, got {value}")
        return repr(value)
    if isinstance(value, dt.datetime):
        return to_utc_timestamp(value)
    raise ValueError(f"expected a string, got {describe(value)}")


def to_json_value(value: t.Any, numbers_as_strings: bool) -> t.Any:
    """Free-form JSON with exact numbers; datetimes become UTC ISO strings.

    The general case: _json_as_text and _json_exact handle the common types first.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"object key {key!r} is not a string")
            out[key] = to_json_value(item, numbers_as_strings)
        return out
    if isinstance(value, list):
        return [to_json_value(item, numbers_as_strings) for item in value]
    if isinstance(value, (int, Decimal, float)):
        number = to_number(value)
        return to_string(number) if numbers_as_strings else number
    if isinstance(value, (dt.datetime, dt.date)):
        return to_utc_timestamp(value)
    raise ValueError(f"{describe(value)} is not JSON")


def to_text(value: t.Any) -> str | None:
    converted = value if type(value) is str else to_string(value)
    return converted if converted and not converted.isspace() else None


def exact_number(value: t.Any) -> t.Any:
    kind = type(value)
    if kind is int or (
        kind is Decimal and value.is_finite() and -MAX_NUMBER_DIGITS < value.adjusted() < MAX_NUMBER_DIGITS
    ):
        return value
    return to_number(value)


def kept_as_is(spec: FieldSpec) -> tuple[frozenset[type], bool]:
    """Value types the field's converter returns unchanged, and whether ints become text."""
    if spec.kind is FieldKind.NUMBER_MAP:
        return frozenset({int}), False
    if spec.kind is FieldKind.STRING_MAP:
        return frozenset({str}), False
    if spec.numbers_as_strings:
        return frozenset({str, bool}), True
    return frozenset({str, bool, int}), False


def map_value_converter(spec: FieldSpec) -> Callable[[t.Any], t.Any]:
    if spec.kind is FieldKind.NUMBER_MAP:
        return exact_number
    if spec.kind is FieldKind.STRING_MAP:
        return lambda value: value if type(value) is str else to_string(value)
    return _json_as_text if spec.numbers_as_strings else _json_exact


def _json_as_text(value: t.Any) -> t.Any:
    """Free-form JSON with every number as its exact decimal text (fast path first)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        return str(value)
    if kind is Decimal and value.is_finite() and -MAX_NUMBER_DIGITS < value.adjusted() < MAX_NUMBER_DIGITS:
        return format(value, "f")
    if kind is dict and all(type(k) is str for k in value):
        return {key: _json_as_text(item) for key, item in value.items()}
    return to_json_value(value, True)


def _json_exact(value: t.Any) -> t.Any:
    """Free-form JSON with exact numbers (fast path first)."""
    kind = type(value)
    if kind is str or kind is bool or kind is int or value is None:
        return value
    if kind is Decimal and value.is_finite() and -MAX_NUMBER_DIGITS < value.adjusted() < MAX_NUMBER_DIGITS:
        return value
    if kind is dict and all(type(k) is str for k in value):
        return {key: _json_exact(item) for key, item in value.items()}
    return to_json_value(value, False)


def encode_payload(payload: Mapping[str, t.Any]) -> bytes:
    return payload_encoder.encode(payload)
