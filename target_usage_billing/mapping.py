"""Pure mapping: per-stream rules that turn a Singer record into one billing payload.

A rule is ``{"stream": GLOB, "preset": NAME?, "filter": EXPR?, "fields": {...}}``. Every
field value is a JMESPath expression compiled once at start-up. The destination says
which fields exist and what kind each is (``FieldSpec``); this module knows nothing of
HTTP or of any particular billing platform.
"""

from __future__ import annotations

import datetime as dt
import difflib
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
import jmespath.functions
import jmespath.visitor as _jp
import msgspec

from target_usage_billing.errors import ConfigError
from target_usage_billing.rulecode import FieldCode, generate_apply

UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
# Epoch numbers at or above this are milliseconds: 1e11 s is the year 5138, 1e11 ms is 1973.
EPOCH_MILLIS_THRESHOLD = 100_000_000_000
# Namespace of derived ids (UUIDv5). Changing it would change every derived id: never do.
ID_NAMESPACE = uuid.UUID("6f1c7a52-3d0e-4b8e-9a51-2f1d0c7e9b44")

# A number whose decimal point sits more than this many digits from its first digit
# (1e200000000, 1e-5000) is refused: written out it would take megabytes, and no usage
# quantity needs it. Checked with Decimal.adjusted(), which costs nothing.
MAX_NUMBER_DIGITS = 1000
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


# --- expressions -------------------------------------------------------------------


class Expression:
    """A compiled JMESPath expression; plain field paths skip the interpreter."""

    __slots__ = ("path", "search", "source", "tree")

    def __init__(
        self,
        source: str,
        search: Callable[[t.Any], t.Any],
        path: list[str] | None = None,
        tree: dict | None = None,
    ):
        self.source = source
        self.search = search
        self.path = path  # the keys, when the expression is a plain field path
        # the parsed expression, when it is in the subset rulecode writes as Python
        self.tree = tree

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
    if len(keys) == 2:
        first, second = keys

        def get_two(value: t.Any) -> t.Any:
            value = value.get(first) if isinstance(value, dict) else None
            return value.get(second) if isinstance(value, dict) else None

        return get_two

    def get_path(value: t.Any) -> t.Any:
        for key in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    return get_path


def _string_literal(children: list[dict]) -> str | None:
    for child in children:
        if child["type"] == "literal" and isinstance(child["value"], str):
            return child["value"]
    return None


def _compile_node(node: dict) -> Callable[[t.Any], t.Any] | None:
    """A Python closure for the common JMESPath subset, None for anything else.

    Covers field paths, ``@``, literals, comparisons, ``&&``, ``||`` and ``!`` with the
    exact semantics of the jmespath package (its own helpers decide equality, ordering
    and truthiness); other expressions use the jmespath interpreter.
    """
    kind = node["type"]
    path = _field_path(node)
    if path is not None:
        return _path_getter(path)
    if kind == "current":
        return lambda value: value
    if kind == "literal":
        literal = node["value"]
        return lambda _value: literal
    parts = [_compile_node(child) for child in node["children"]]
    if any(part is None for part in parts):
        return None
    if kind == "subexpression":

        def chain(value: t.Any) -> t.Any:
            for part in parts:
                value = part(value)  # type: ignore[misc]
            return value

        return chain
    if kind == "comparator":
        left, right = parts
        compare = _jp.TreeInterpreter.COMPARATOR_FUNC[node["value"]]
        if node["value"] in ("eq", "ne"):
            text = _string_literal(node["children"])
            if text is not None:
                # Against a string, JMESPath equality is plain equality (its special case
                # only concerns 0/1 against booleans), so skip its number checks.
                other_node = node["children"][0 if node["children"][1]["type"] == "literal" else 1]
                other = left if other_node is node["children"][0] else right
                key_path = _field_path(other_node)
                if key_path is not None and len(key_path) == 1:
                    (key,) = key_path  # `field == 'text'`: the most common filter of all
                    if node["value"] == "eq":
                        return lambda value: type(value) is dict and value.get(key) == text
                    return lambda value: not (type(value) is dict and value.get(key) == text)
                if node["value"] == "eq":
                    return lambda value: other(value) == text  # type: ignore[misc]
                return lambda value: other(value) != text  # type: ignore[misc]
            return lambda value: compare(left(value), right(value))  # type: ignore[misc]

        operator = node["value"]
        return lambda value: jmespath_order(operator, left(value), right(value))  # type: ignore[misc]
    if kind == "and_expression":
        left, right = parts

        def both(value: t.Any) -> t.Any:
            matched = left(value)  # type: ignore[misc]
            return right(value) if is_truthy(matched) else matched  # type: ignore[misc]

        return both
    if kind == "or_expression":
        left, right = parts

        def either(value: t.Any) -> t.Any:
            matched = left(value)  # type: ignore[misc]
            return matched if is_truthy(matched) else right(value)  # type: ignore[misc]

        return either
    if kind == "not_expression":
        (inner,) = parts

        return lambda value: jmespath_not(inner(value))  # type: ignore[misc]
    return None


def compile_expression(source: t.Any, where: str) -> Expression:
    """Compile one JMESPath expression, or raise ConfigError naming ``where``."""
    if not isinstance(source, str) or not source.strip():
        msg = f"{where}: expected a JMESPath expression (a non-empty string), got {source!r}"
        raise ConfigError(msg)
    try:
        compiled = jmespath.compile(source)
    except jmespath.exceptions.JMESPathError as exc:
        raise ConfigError(
            f"{where}: expression {source!r} does not compile: {_compile_error(source, exc)}"
        ) from None
    for name in _function_names(compiled.parsed):
        if name not in _KNOWN_FUNCTIONS:
            close = difflib.get_close_matches(name, _KNOWN_FUNCTIONS, n=1, cutoff=0.6)
            hint = (
                f"; did you mean {close[0]}()?"
                if close
                else f" (functions: {', '.join(sorted(_KNOWN_FUNCTIONS))})"
            )
            raise ConfigError(f"{where}: expression {source!r} calls unknown function {name}(){hint}")
    fast = _compile_node(compiled.parsed)
    if fast is None:
        return Expression(source, compiled.search)
    return Expression(source, fast, _field_path(compiled.parsed), compiled.parsed)


_KNOWN_FUNCTIONS = frozenset(jmespath.functions.Functions.FUNCTION_TABLE)


def _function_names(node: t.Any) -> t.Iterator[str]:
    if isinstance(node, dict):
        if node.get("type") == "function_expression":
            yield node["value"]
        for child in node.get("children", ()):
            yield from _function_names(child)


def _compile_error(source: str, exc: Exception) -> str:
    """The parser's complaint with its position marked in the expression, on one line."""
    if isinstance(exc, jmespath.exceptions.IncompleteExpressionError):
        reason = "it ends too early"
    else:
        reason = getattr(exc, "message", None) or getattr(exc, "msg", None) or type(exc).__name__
        token = getattr(exc, "token_value", None)
        if token is not None and not isinstance(exc, jmespath.exceptions.LexerError):
            reason += f" {token!r}"
    position = getattr(exc, "lex_position", None)
    if not isinstance(position, int) or not 0 <= position <= len(source):
        return reason
    return f"{reason} at column {position + 1}: {source[:position]}\u2192{source[position:]}"


def jmespath_order(operator: str, a: t.Any, b: t.Any) -> t.Any:
    """``a < b`` and kin as JMESPath answers them: null unless both are numbers or strings."""
    if not (_jp._is_comparable(a) and _jp._is_comparable(b)):
        return None
    return _jp.TreeInterpreter.COMPARATOR_FUNC[operator](a, b)


def jmespath_not(value: t.Any) -> bool:
    """JMESPath ``!value``."""
    if _jp._is_actual_number(value) and value == 0:
        return False  # JMESPath: !0 is false
    return not value


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
        if (isinstance(value, float) and not math.isfinite(value)) or (
            isinstance(value, Decimal) and not value.is_finite()
        ):
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
        return format(_bounded(value), "f")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"expected a string, got {value}")
        return repr(value)
    if isinstance(value, dt.datetime):
        return to_utc_timestamp(value)
    raise ValueError(f"expected a string, got {_describe(value)}")


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
    raise ValueError(f"{_describe(value)} is not JSON")


def derive_id(stream: str, record: Mapping[str, t.Any], key_properties: Sequence[str]) -> str:
    """Deterministic UUIDv5 over the stream name and the key properties (or whole record).

    The same record always gets the same id, so a re-send after a crash or an overlapping
    backfill is de-duplicated by the billing platform. SDK metadata (_sdc_*) is ignored.
    A key property that is missing, null or empty cannot tell records apart (every such
    record would share one id and all but the first would be dropped as re-sends): then
    the whole record is the basis.
    """
    basis: t.Any = None
    if key_properties:
        basis = [record.get(key) for key in key_properties]
        if any(value is None or value == "" for value in basis):
            basis = None
    if basis is None:
        basis = {k: v for k, v in record.items() if not k.startswith("_sdc_")}
    hasher = hashlib.sha1(ID_NAMESPACE.bytes + stream.encode() + b"\x00")
    hasher.update(_canonical_encoder.encode(basis))  # no concatenated copy of a large record
    digest = hasher.digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


# --- rules -------------------------------------------------------------------------


class CompiledField:
    """How one payload field is computed: ``compute(record)`` gives its value or None."""

    __slots__ = ("compute", "inline", "source", "spec")

    def __init__(
        self,
        spec: FieldSpec,
        compute: Callable[[t.Any], t.Any],
        source: str | None,
        inline: tuple | None = None,
    ):
        self.spec = spec
        self.compute = compute
        self.source = source  # the expression, for error messages
        self.inline = inline  # how rulecode may inline it (see FieldCode.inline)


_MAP_KINDS = (FieldKind.STRING_MAP, FieldKind.NUMBER_MAP, FieldKind.OBJECT)


def _text(value: t.Any) -> str | None:
    converted = value if type(value) is str else to_string(value)
    return converted if converted and not converted.isspace() else None


def _exact_number(value: t.Any) -> t.Any:
    kind = type(value)
    if kind is int or (
        kind is Decimal and value.is_finite() and -MAX_NUMBER_DIGITS < value.adjusted() < MAX_NUMBER_DIGITS
    ):
        return value
    return to_number(value)


def _kept_as_is(spec: FieldSpec) -> tuple[frozenset[type], bool]:
    """Value types the field's converter returns unchanged, and whether ints become text."""
    if spec.kind is FieldKind.NUMBER_MAP:
        return frozenset({int}), False
    if spec.kind is FieldKind.STRING_MAP:
        return frozenset({str}), False
    if spec.numbers_as_strings:
        return frozenset({str, bool}), True
    return frozenset({str, bool, int}), False


def _map_value_converter(spec: FieldSpec) -> Callable[[t.Any], t.Any]:
    if spec.kind is FieldKind.NUMBER_MAP:
        return _exact_number
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


def _shared_parent(source: dict, name: str) -> tuple[str, list[tuple[str, str, str, str]]] | None:
    """For keys that all read ``parent.child`` of one parent: (parent, [(key, child, ...)])."""
    parent = None
    children = []
    for key, expression_source in source.items():
        if not isinstance(expression_source, str):
            return None
        try:
            path = _field_path(jmespath.compile(expression_source).parsed)
        except jmespath.exceptions.JMESPathError:
            return None
        if path is None or len(path) != 2 or (parent is not None and path[0] != parent):
            return None
        parent = path[0]
        children.append((key, path[1], expression_source, f"{name}.{key}"))
    return (parent, children) if parent is not None else None


def _compile_field(spec: FieldSpec, source: t.Any, where: str) -> CompiledField:
    """Specialise the field's computation once, so each record pays only for its kind."""
    name = spec.name
    if isinstance(source, dict) and spec.kind in _MAP_KINDS:
        if not source:
            raise ConfigError(f"{where}: give at least one key")
        convert = _map_value_converter(spec)
        keyed = []
        paths = []  # each key's field path, when it is a plain one
        for key, expression_source in source.items():
            if spec.key_pattern is not None and not spec.key_pattern.match(key):
                pattern = spec.key_pattern.pattern
                raise ConfigError(f"{where}: key {key!r} is not a valid data-field code ({pattern})")
            expression = compile_expression(expression_source, f"{where}.{key}")
            keyed.append((key, expression.search, expression.source, f"{name}.{key}"))
            paths.append(expression.path)

        shared = _shared_parent(source, name)
        if shared is not None:
            parent, children = shared

            def compute_children(record: dict) -> t.Any:
                # every key reads a field of the same object (e.g. properties.*): find it once
                base = record.get(parent) if isinstance(record, dict) else None
                if not isinstance(base, dict):
                    return None
                out = {}
                for key, child, expression_source, field_name in children:
                    value = base.get(child)
                    if value is None:
                        continue
                    try:
                        out[key] = convert(value)
                    except ValueError as exc:
                        raise MappingRejection(str(exc), field_name, expression_source) from None
                return out or None

            inline = ("children", parent, children, _kept_as_is(spec), convert)
            return CompiledField(spec, compute_children, None, inline)

        def compute_keyed(record: dict) -> t.Any:
            out = {}
            for key, get, expression_source, field_name in keyed:
                try:
                    value = get(record)
                except Exception as exc:  # e.g. a JMESPath function given the wrong type
                    msg = f"expression failed: {exc}"
                    raise MappingRejection(msg, field_name, expression_source) from None
                if value is None:
                    continue  # a null key is left out
                try:
                    out[key] = convert(value)
                except ValueError as exc:
                    raise MappingRejection(str(exc), field_name, expression_source) from None
            return out or None

        inline = None
        if all(path is not None and len(path) <= 2 for path in paths):
            entries = [(key, path, text, label) for (key, _get, text, label), path in zip(keyed, paths)]
            inline = ("keyed", entries, _kept_as_is(spec), convert)
        return CompiledField(spec, compute_keyed, None, inline)

    expression = compile_expression(source, where)
    get = expression.search
    if spec.kind in _MAP_KINDS:
        convert = _map_value_converter(spec)
        key_pattern = spec.key_pattern
        keep, ints_as_text = _kept_as_is(spec)

        def compute_object(record: dict) -> t.Any:
            value = get(record)
            if value is None:
                return None
            if not isinstance(value, dict):
                msg = f"expected an object, got {_describe(value)}"
                raise MappingRejection(msg, name, expression.source)
            out = {}
            for key, item in value.items():
                if key_pattern is not None and not (isinstance(key, str) and key_pattern.match(key)):
                    msg = f"key {key!r} is not a valid data-field code ({key_pattern.pattern})"
                    raise MappingRejection(msg, f"{name}.{key}", expression.source)
                if item is None:
                    continue
                kind = type(item)
                if kind in keep:  # already what the converter would give: no call
                    out[key] = item
                    continue
                if ints_as_text and kind is int:
                    out[key] = str(item)
                    continue
                try:
                    out[key] = convert(item)
                except ValueError as exc:
                    raise MappingRejection(str(exc), f"{name}.{key}", expression.source) from None
            return out or None

        return CompiledField(spec, compute_object, expression.source)

    convert = to_utc_timestamp if spec.kind is FieldKind.TIMESTAMP else _text
    path = expression.path
    if path is not None and len(path) <= 2:
        compute = _plain_scalar(path, convert, name, expression.source)
        inline = ("plain", list(path), convert, convert is _text)
        return CompiledField(spec, compute, expression.source, inline)

    def compute_scalar(record: dict) -> t.Any:
        value = get(record)
        if value is None:
            return None
        try:
            return convert(value)
        except ValueError as exc:
            raise MappingRejection(str(exc), name, expression.source) from None

    inline = ("expression", expression.tree, convert, convert is _text) if expression.tree else None
    return CompiledField(spec, compute_scalar, expression.source, inline)


def _plain_scalar(
    path: list[str], convert: Callable[[t.Any], t.Any], name: str, source: str
) -> Callable[[dict], t.Any]:
    """A scalar field read from ``record[a]`` or ``record[a][b]``: one call per record.

    The most common shape of all (ids, customers, times): the lookup and the common
    string case are inlined. The record itself is always an object here.
    """
    first = path[0]
    second = path[1] if len(path) == 2 else None
    is_text = convert is _text

    def compute_plain(record: dict) -> t.Any:
        value = record.get(first)
        if second is not None:
            value = value.get(second) if type(value) is dict else None
        if value is None:
            return None
        if is_text and type(value) is str:
            return value if value and not value.isspace() else None
        try:
            return convert(value)
        except ValueError as exc:
            raise MappingRejection(str(exc), name, source) from None

    return compute_plain


class CompiledRule:
    """One mapping rule, compiled: apply() turns a record into a payload dict.

    A rule with ``skip`` set maps nothing: it says that the streams it matches carry no
    usage, so their records are counted and left out on purpose.
    """

    def __init__(
        self,
        index: int,
        stream_pattern: str,
        filter_expression: Expression | None,
        fields: list[CompiledField],
        *,
        skip: bool = False,
    ):
        self.index = index
        self.stream_pattern = stream_pattern
        self._stream_regex = re.compile(fnmatch.translate(stream_pattern))
        self.filter = filter_expression
        self.skip = skip
        self.reads: list[FieldRead] = []  # set by compile_rules
        # the payload field that carries the idempotency key (None: the platform has none)
        self.id_field = next((f.spec.name for f in fields if f.spec.kind is FieldKind.ID), None)
        self._plan = [
            (f.spec.name, f.compute, f.spec.required, f.spec.kind is FieldKind.ID, f.source) for f in fields
        ]
        # The hot path: the same rule as one generated function (see rulecode).
        self.apply = generate_apply(
            [
                FieldCode(
                    f.spec.name, f.source, f.spec.required, f.spec.kind is FieldKind.ID, f.compute, f.inline
                )
                for f in fields
            ],
            filter_expression,
            {
                "MappingRejection": MappingRejection,
                "derive_id": derive_id,
                "is_truthy": is_truthy,
                "jmespath_equals": _jp.TreeInterpreter.COMPARATOR_FUNC["eq"],
                "jmespath_order": jmespath_order,
                "jmespath_not": jmespath_not,
            },
        )

    @property
    def where(self) -> str:
        """How the user wrote the rule, for messages: ``mappings[1] (stream 'api_*')``."""
        return f"mappings[{self.index}] (stream {self.stream_pattern!r})"

    def matches(self, stream: str) -> bool:
        return self._stream_regex.match(stream) is not None

    def apply_generic(
        self, record: dict, stream: str, key_properties: Sequence[str] = ()
    ) -> dict[str, t.Any] | None:
        """The payload for ``record``, None when the filter drops it (``apply`` is the same,
        generated as one function; this is the reference it is tested against).

        Raises MappingRejection naming the field and expression when the record cannot
        become a valid payload (including an expression that fails on this record).
        """
        name: str | None = None
        source: str | None = None
        try:
            if self.filter is not None:
                name, source = "filter", self.filter.source
                matched = self.filter.search(record)
                if matched is not True and not is_truthy(matched):
                    return None
            payload: dict[str, t.Any] = {}
            for name, compute, required, is_id, source in self._plan:
                value = compute(record)
                if value is None:
                    if is_id:
                        payload[name] = derive_id(stream, record, key_properties)
                    elif required:
                        raise MappingRejection("required value is missing or empty", name, source)
                    continue
                payload[name] = value
            return payload
        except MappingRejection:
            raise
        except Exception as exc:  # e.g. a JMESPath function given the wrong type
            raise MappingRejection(f"expression failed: {exc}", name, source) from None


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
    rules = []
    for index, raw in enumerate(raw_rules):
        where = f"mappings[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a rule must be an object, got {raw!r}")
        unknown = sorted(set(raw) - {"stream", "filter", "fields", "preset", "skip"})
        if unknown:
            msg = (
                f"{where}: unknown key(s) {', '.join(unknown)} "
                "(allowed: stream, preset, filter, fields, skip)"
            )
            raise ConfigError(msg)
        stream = raw.get("stream")
        if not isinstance(stream, str) or not stream:
            raise ConfigError(f"{where}.stream: give a stream name or glob pattern")
        skip = raw.get("skip", False)
        if not isinstance(skip, bool):
            raise ConfigError(f"{where}.skip: must be true or false, got {skip!r}")
        if skip:
            if set(raw) - {"stream", "skip"}:
                msg = f"{where}: a rule with skip: true maps nothing; give it only stream and skip"
                raise ConfigError(msg)
            rules.append(CompiledRule(index, stream, None, [], skip=True))
            continue
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
                    compiled_fields.append(CompiledField(spec, lambda _record: None, None))
                continue
            compiled_fields.append(_compile_field(spec, source, fwhere))
        filter_expression = (
            compile_expression(filter_source, f"{where}.filter") if filter_source is not None else None
        )
        rule = CompiledRule(index, stream, filter_expression, compiled_fields)
        rule.reads = [
            FieldRead(label, text, path, spec.required)
            for spec in specs
            if fields_raw.get(spec.name) is not None
            for label, text, path in _reads(spec.name, fields_raw[spec.name])
        ]
        rules.append(rule)
    return rules


class FieldRead(t.NamedTuple):
    """A record property a rule reads, for checking it against the stream's schema."""

    label: str  # the payload field, e.g. "measure.tokens"
    source: str  # the expression
    path: list[str] | None  # the keys when the expression is a plain path
    required: bool


def _reads(name: str, source: t.Any) -> list[tuple[str, str, list[str] | None]]:
    sources = source.items() if isinstance(source, dict) else [(None, source)]
    out = []
    for key, text in sources:
        label = f"{name}.{key}" if key is not None else name
        try:
            path = _field_path(jmespath.compile(text).parsed)
        except jmespath.exceptions.JMESPathError:  # pragma: no cover - compiled already
            path = None
        out.append((label, text, path))
    return out


def find_rule(rules: Sequence[CompiledRule], stream: str) -> CompiledRule | None:
    """The first rule whose stream pattern matches."""
    for rule in rules:
        if rule.matches(stream):
            return rule
    return None


def encode_payload(payload: Mapping[str, t.Any]) -> bytes:
    return payload_encoder.encode(payload)
