"""Pure mapping: per-stream rules that turn a Singer record into one billing payload.

A rule is ``{"stream": GLOB, "preset": NAME?, "filter": EXPR?, "fields": {...}}``. Every
field value is a JMESPath expression compiled once at start-up. The destination says
which fields exist and what kind each is (``FieldSpec``); this module knows nothing of
HTTP or of any particular billing platform.
"""

from __future__ import annotations

import datetime as dt
import enum
import fnmatch
import hashlib
import math
import re
import typing as t
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

import jmespath
import jmespath.exceptions
import msgspec

from target_usage_billing.errors import ConfigError

UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
# Epoch numbers at or above this are milliseconds: 1e11 s is the year 5138, 1e11 ms is 1973.
EPOCH_MILLIS_THRESHOLD = 100_000_000_000
# Namespace of derived ids (UUIDv5). Changing it would change every derived id: never do.
ID_NAMESPACE = uuid.UUID("6f1c7a52-3d0e-4b8e-9a51-2f1d0c7e9b44")

_CANONICAL_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{3}|\.\d{6})?Z\Z")
_NANOS = re.compile(r"(.*\.\d{6})\d+(.*)\Z")
_NUMERIC = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")

payload_encoder = msgspec.json.Encoder(decimal_format="number")
_canonical_encoder = msgspec.json.Encoder(decimal_format="number", order="sorted")


class FieldKind(enum.Enum):
    ID = "id"  # idempotency key; derived when the rule gives none
    STRING = "string"
    TIMESTAMP = "timestamp"  # -> UTC ISO 8601 ending in Z
    STRING_MAP = "string map"  # object of string -> string
    NUMBER_MAP = "number map"  # object of string -> number (exact decimals)
    OBJECT = "object"  # free-form JSON object


@dataclass(frozen=True)
class FieldSpec:
    """One field of a destination's payload, as declared by the destination."""

    name: str
    kind: FieldKind
    required: bool = False
    key_pattern: re.Pattern[str] | None = None  # map kinds: allowed keys
    numbers_as_strings: bool = False  # OBJECT: send numbers as strings
    description: str = ""


@dataclass(frozen=True)
class Preset:
    """Defaults a rule can name: a filter and field expressions, overridable by the rule."""

    description: str
    fields: Mapping[str, t.Any]
    filter: str | None = None


class MappingRejection(Exception):
    """A record that cannot become a valid payload; carries a structured reason."""

    def __init__(self, reason: str, field: str | None = None, expression: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.expression = expression

    def __str__(self) -> str:
        where = ""
        if self.field:
            where = f"field '{self.field}'"
            if self.expression:
                where += f" (expression {self.expression!r})"
            where += ": "
        return where + self.reason

    def as_dict(self) -> dict[str, t.Any]:
        return {"field": self.field, "expression": self.expression, "reason": self.reason}


# --- expressions -------------------------------------------------------------------


class Expression:
    """A compiled JMESPath expression; plain field paths skip the interpreter."""

    __slots__ = ("search", "source")

    def __init__(self, source: str, search: Callable[[t.Any], t.Any]):
        self.source = source
        self.search = search

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def _field_path(node: dict) -> list[str] | None:
    if node["type"] == "field":
        return [node["value"]]
    if node["type"] == "subexpression":
        keys: list[str] = []
        for child in node["children"]:
            sub = _field_path(child)
            if sub is None:
                return None
            keys.extend(sub)
        return keys
    return None


def _path_getter(keys: list[str]) -> Callable[[t.Any], t.Any]:
    # Same answers as JMESPath for a field path: None when any step is not an object.
    if len(keys) == 1:
        (key,) = keys

        def get_one(value: t.Any) -> t.Any:
            return value.get(key) if isinstance(value, dict) else None

        return get_one

    def get_path(value: t.Any) -> t.Any:
        for key in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    return get_path


def compile_expression(source: t.Any, where: str) -> Expression:
    """Compile one JMESPath expression, or raise ConfigError naming ``where``."""
    if not isinstance(source, str) or not source.strip():
        msg = f"{where}: expected a JMESPath expression (a non-empty string), got {source!r}"
        raise ConfigError(msg)
    try:
        compiled = jmespath.compile(source)
    except jmespath.exceptions.JMESPathError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        msg = f"{where}: expression {source!r} does not compile: {detail}"
        raise ConfigError(msg) from None
    path = _field_path(compiled.parsed)
    if path is not None:
        return Expression(source, _path_getter(path))
    if compiled.parsed["type"] == "literal":
        literal = compiled.parsed["value"]
        return Expression(source, lambda _record: literal)
    return Expression(source, compiled.search)


def is_truthy(value: t.Any) -> bool:
    """JMESPath truthiness: false, null, '', [] and {} are false; 0 is true."""
    if value is None or value is False:
        return False
    if isinstance(value, (str, list, dict)):
        return len(value) > 0
    return True


# --- value coercion ----------------------------------------------------------------


def _describe(value: t.Any) -> str:
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


def _from_epoch(number: Decimal | int | float) -> dt.datetime:
    value = Decimal(repr(number)) if isinstance(number, float) else Decimal(number)
    if abs(value) >= EPOCH_MILLIS_THRESHOLD:
        value = value / 1000
    micros = int((value * 1_000_000).to_integral_value(rounding=ROUND_HALF_EVEN))
    return _EPOCH + dt.timedelta(microseconds=micros)


def to_utc_timestamp(value: t.Any) -> str:
    """Normalise a timestamp to UTC ISO 8601 ending in Z.

    Accepts datetime/date objects, ISO 8601 strings with any offset, and epoch seconds or
    milliseconds (numbers or numeric strings). Naive times are taken as UTC.
    Raises ValueError with a reason for anything else.
    """
    if isinstance(value, str):
        if _CANONICAL_TS.match(value):
            try:  # already canonical: only check that the date and time exist
                dt.datetime.fromisoformat(value[:-1])
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
        msg = f"{_describe(value)} is not a timestamp"
        raise ValueError(msg)
    elif isinstance(value, (int, float, Decimal)):
        if isinstance(value, (float, Decimal)) and not math.isfinite(value):
            msg = f"{_describe(value)} is not a timestamp"
            raise ValueError(msg)
        try:
            moment = _from_epoch(value)
        except (OverflowError, InvalidOperation):
            msg = f"epoch number {value} is out of range"
            raise ValueError(msg) from None
    else:
        msg = f"{_describe(value)} is not a timestamp"
        raise ValueError(msg)
    try:
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:
        msg = f"{value!r} is out of range"
        raise ValueError(msg) from None
    return format_utc(moment)


def to_number(value: t.Any) -> int | float | Decimal:
    """A JSON number with the exact decimal value given; raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {_describe(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, (Decimal, float)):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value}")
        return value
    if isinstance(value, str):
        text = value.strip()
        if _NUMERIC.match(text):
            return Decimal(text)
    raise ValueError(f"expected a number, got {_describe(value)}")


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
        return format(value, "f")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"expected a string, got {value}")
        return repr(value)
    if isinstance(value, dt.datetime):
        return to_utc_timestamp(value)
    raise ValueError(f"expected a string, got {_describe(value)}")


def to_json_value(value: t.Any, numbers_as_strings: bool) -> t.Any:
    """Free-form JSON with exact numbers; datetimes become UTC ISO strings."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"object key {key!r} is not a string")
            out[key] = to_json_value(item, numbers_as_strings)
        return out
    if isinstance(value, list):
        return [to_json_value(item, numbers_as_strings) for item in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, Decimal, float)):
        number = to_number(value)
        return to_string(number) if numbers_as_strings else number
    if isinstance(value, (dt.datetime, dt.date)):
        return to_utc_timestamp(value)
    raise ValueError(f"{_describe(value)} is not JSON")


def derive_id(stream: str, record: Mapping[str, t.Any], key_properties: Sequence[str]) -> str:
    """Deterministic UUIDv5 over the stream name and the key properties (or whole record).

    The same record always gets the same id, so a re-send after a crash or an overlapping
    backfill is de-duplicated by the billing platform. SDK metadata (_sdc_*) is ignored.
    """
    if key_properties:
        basis: t.Any = [record.get(key) for key in key_properties]
    else:
        basis = {k: v for k, v in record.items() if not k.startswith("_sdc_")}
    digest = hashlib.sha1(
        ID_NAMESPACE.bytes + stream.encode() + b"\x00" + _canonical_encoder.encode(basis)
    ).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


# --- rules -------------------------------------------------------------------------


class CompiledField:
    """How one payload field is computed: one expression, or one per key of a map."""

    __slots__ = ("expression", "key_expressions", "spec")

    def __init__(
        self,
        spec: FieldSpec,
        expression: Expression | None,
        key_expressions: list[tuple[str, Expression]] | None,
    ):
        self.spec = spec
        self.expression = expression
        self.key_expressions = key_expressions


_MAP_KINDS = (FieldKind.STRING_MAP, FieldKind.NUMBER_MAP, FieldKind.OBJECT)
_NOTHING = Expression("", lambda _record: None)


class CompiledRule:
    """One mapping rule, compiled: apply() turns a record into a payload dict."""

    def __init__(
        self,
        index: int,
        stream_pattern: str,
        filter_expression: Expression | None,
        fields: list[CompiledField],
        id_field: str | None,
        preset: str | None,
    ):
        self.index = index
        self.stream_pattern = stream_pattern
        self._stream_regex = re.compile(fnmatch.translate(stream_pattern))
        self.filter = filter_expression
        self.fields = fields
        self.id_field = id_field
        self.preset = preset

    def matches(self, stream: str) -> bool:
        return self._stream_regex.match(stream) is not None

    def apply(self, record: dict, stream: str, key_properties: Sequence[str] = ()) -> dict[str, t.Any] | None:
        """The payload for ``record``, None when the filter drops it.

        Raises MappingRejection naming the field and expression when the record cannot
        become a valid payload.
        """
        if self.filter is not None and not is_truthy(self.filter.search(record)):
            return None
        payload: dict[str, t.Any] = {}
        for field in self.fields:
            value = _compute(field, record)
            if value is None:
                spec = field.spec
                if spec.kind is FieldKind.ID:
                    payload[spec.name] = derive_id(stream, record, key_properties)
                elif spec.required:
                    source = field.expression.source if field.expression else None
                    raise MappingRejection("required value is missing or empty", spec.name, source)
                continue
            payload[field.spec.name] = value
        return payload


def _compute(field: CompiledField, record: dict) -> t.Any:
    spec = field.spec
    kind = spec.kind
    if field.key_expressions is not None:
        raw: t.Any = {}
        for key, expression in field.key_expressions:
            raw[key] = _map_value(spec, key, expression.search(record), expression.source)
        raw = {k: v for k, v in raw.items() if v is not None}
        return raw or None
    expression = field.expression
    assert expression is not None
    value = expression.search(record)
    if value is None:
        return None
    try:
        if kind is FieldKind.TIMESTAMP:
            return to_utc_timestamp(value)
        if kind is FieldKind.ID or kind is FieldKind.STRING:
            text = to_string(value)
            return text if text.strip() else None
    except ValueError as exc:
        raise MappingRejection(str(exc), spec.name, expression.source) from None
    # map kinds given as one expression yielding an object
    if not isinstance(value, dict):
        raise MappingRejection(f"expected an object, got {_describe(value)}", spec.name, expression.source)
    out = {}
    for key, item in value.items():
        converted = _map_value(spec, key, item, expression.source)
        if converted is not None:
            out[key] = converted
    return out or None


def _map_value(spec: FieldSpec, key: t.Any, value: t.Any, source: str) -> t.Any:
    name = f"{spec.name}.{key}"
    if spec.key_pattern is not None and not (isinstance(key, str) and spec.key_pattern.match(key)):
        raise MappingRejection(
            f"key {key!r} is not a valid data-field code ({spec.key_pattern.pattern})",
            name,
            source,
        )
    if value is None:
        return None
    try:
        if spec.kind is FieldKind.NUMBER_MAP:
            return to_number(value)
        if spec.kind is FieldKind.STRING_MAP:
            return to_string(value)
        return to_json_value(value, spec.numbers_as_strings)
    except ValueError as exc:
        raise MappingRejection(str(exc), name, source) from None


def compile_rules(
    raw_rules: t.Any,
    specs: Sequence[FieldSpec],
    presets: Mapping[str, Preset],
    destination: str,
) -> list[CompiledRule]:
    """Compile the ``mappings`` setting; raise ConfigError naming the faulty rule/field."""
    if not isinstance(raw_rules, list) or not raw_rules:
        msg = 'mappings: give at least one rule, e.g. [{"stream": "*", "fields": {...}}]'
        raise ConfigError(msg)
    by_name = {spec.name: spec for spec in specs}
    id_fields = [spec.name for spec in specs if spec.kind is FieldKind.ID]
    rules = []
    for index, raw in enumerate(raw_rules):
        where = f"mappings[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a rule must be an object, got {raw!r}")
        unknown = sorted(set(raw) - {"stream", "filter", "fields", "preset"})
        if unknown:
            msg = f"{where}: unknown key(s) {', '.join(unknown)} (allowed: stream, preset, filter, fields)"
            raise ConfigError(msg)
        stream = raw.get("stream")
        if not isinstance(stream, str) or not stream:
            raise ConfigError(f"{where}.stream: give a stream name or glob pattern")
        fields_raw = raw.get("fields", {})
        if not isinstance(fields_raw, dict):
            raise ConfigError(f"{where}.fields: must be an object of field -> expression")
        filter_source = raw.get("filter")
        preset_name = raw.get("preset")
        if preset_name is not None:
            if preset_name not in presets:
                known = ", ".join(sorted(presets)) or "none"
                msg = f"{where}.preset: unknown preset {preset_name!r} for {destination} (known: {known})"
                raise ConfigError(msg)
            preset = presets[preset_name]
            fields_raw = {**preset.fields, **fields_raw}
            if "filter" not in raw:
                filter_source = preset.filter
        bad = sorted(set(fields_raw) - set(by_name))
        if bad:
            msg = (
                f"{where}.fields: unknown field(s) {', '.join(bad)} for {destination} "
                f"(fields: {', '.join(by_name)})"
            )
            raise ConfigError(msg)
        compiled_fields = []
        for spec in specs:
            source = fields_raw.get(spec.name)
            fwhere = f"{where}.fields.{spec.name}"
            if source is None:
                if spec.required:
                    msg = f"{fwhere}: {destination} requires this field; give an expression"
                    raise ConfigError(msg)
                if spec.kind is FieldKind.ID:  # no expression: apply() derives the id
                    compiled_fields.append(CompiledField(spec, _NOTHING, None))
                continue
            if isinstance(source, dict) and spec.kind in _MAP_KINDS:
                if not source:
                    raise ConfigError(f"{fwhere}: give at least one key")
                keyed = []
                for key, expr in source.items():
                    if spec.key_pattern is not None and not spec.key_pattern.match(key):
                        pattern = spec.key_pattern.pattern
                        msg = f"{fwhere}: key {key!r} is not a valid data-field code ({pattern})"
                        raise ConfigError(msg)
                    keyed.append((key, compile_expression(expr, f"{fwhere}.{key}")))
                compiled_fields.append(CompiledField(spec, None, keyed))
            else:
                compiled_fields.append(CompiledField(spec, compile_expression(source, fwhere), None))
        filter_expression = (
            compile_expression(filter_source, f"{where}.filter") if filter_source is not None else None
        )
        rules.append(
            CompiledRule(
                index,
                stream,
                filter_expression,
                compiled_fields,
                id_fields[0] if id_fields else None,
                preset_name,
            )
        )
    return rules


def find_rule(rules: Sequence[CompiledRule], stream: str) -> CompiledRule | None:
    """The first rule whose stream pattern matches."""
    for rule in rules:
        if rule.matches(stream):
            return rule
    return None


def encode_payload(payload: Mapping[str, t.Any]) -> bytes:
    return payload_encoder.encode(payload)
