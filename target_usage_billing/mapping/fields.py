"""One payload field compiled: its expression(s) and conversion, specialised once."""

from __future__ import annotations

import typing as t
from collections.abc import Callable

import jmespath
import jmespath.exceptions

from target_usage_billing.errors import ConfigError
from target_usage_billing.mapping.coerce import (
    describe,
    kept_as_is,
    map_value_converter,
    to_text,
    to_unix_seconds,
    to_utc_timestamp,
)
from target_usage_billing.mapping.expressions import Expression, compile_expression, field_path
from target_usage_billing.mapping.plans import (
    ChildEntry,
    ChildrenPlan,
    ExpressionPlan,
    InlinePlan,
    KeyedEntry,
    KeyedPlan,
    ObjectPlan,
    PlainPlan,
)
from target_usage_billing.mapping.spec import FieldKind, FieldSpec, MappingRejection


class CompiledField:
    """How one payload field is computed: ``compute(record)`` gives its value or None."""

    __slots__ = ("compute", "inline", "source", "spec")

    def __init__(
        self,
        spec: FieldSpec,
        compute: Callable[[t.Any], t.Any],
        source: str | None,
        inline: InlinePlan | None = None,
    ):
        self.spec = spec
        self.compute = compute
        self.source = source  # the expression, for error messages
        self.inline = inline  # how codegen may inline it (see FieldCode.inline)


MAP_KINDS = (FieldKind.STRING_MAP, FieldKind.NUMBER_MAP, FieldKind.OBJECT)
_SCALAR_CONVERTERS: dict[FieldKind, Callable[[t.Any], t.Any]] = {
    FieldKind.TIMESTAMP: to_utc_timestamp,
    FieldKind.UNIX_TIME: to_unix_seconds,
}


def _shared_parent(source: dict, name: str) -> tuple[str, list[ChildEntry]] | None:
    """For keys that all read ``parent.child`` of one parent: (parent, [(key, child, ...)])."""
    parent = None
    children = []
    for key, expression_source in source.items():
        if not isinstance(expression_source, str):
            return None
        try:
            path = field_path(jmespath.compile(expression_source).parsed)
        except jmespath.exceptions.JMESPathError:
            return None
        if path is None or len(path) != 2 or (parent is not None and path[0] != parent):
            return None
        parent = path[0]
        children.append(ChildEntry(key, path[1], expression_source, f"{name}.{key}"))
    return (parent, children) if parent is not None else None


def compile_field(spec: FieldSpec, source: t.Any, where: str) -> CompiledField:
    """Specialise the field's computation once, so each record pays only for its kind."""
    if isinstance(source, dict) and spec.kind in MAP_KINDS:
        return _keyed_map(spec, source, where)
    expression = compile_expression(source, where)
    if spec.kind in MAP_KINDS:
        return _object(spec, expression)
    return _scalar(spec, expression)


def _keyed_map(spec: FieldSpec, source: dict, where: str) -> CompiledField:
    """A map field given key by key: ``{"tokens": "properties.tokens", ...}``."""
    name = spec.name
    if not source:
        raise ConfigError(f"{where}: give at least one key")
    convert = map_value_converter(spec)
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

        plan = ChildrenPlan(parent, children, kept_as_is(spec), convert)
        return CompiledField(spec, compute_children, None, plan)

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

    keyed_plan: KeyedPlan | None = None
    if all(path is not None and len(path) <= 2 for path in paths):
        entries = [
            KeyedEntry(key, t.cast(list, path), text, label)
            for (key, _get, text, label), path in zip(keyed, paths)
        ]
        keyed_plan = KeyedPlan(entries, kept_as_is(spec), convert)
    return CompiledField(spec, compute_keyed, None, keyed_plan)


def _object(spec: FieldSpec, expression: Expression) -> CompiledField:
    """A map field given as one expression that yields an object (``properties``)."""
    name = spec.name
    get = expression.search
    convert = map_value_converter(spec)
    key_pattern = spec.key_pattern
    keep, ints_as_text = kept_as_is(spec)

    def compute_object(record: dict) -> t.Any:
        value = get(record)
        if value is None:
            return None
        if not isinstance(value, dict):
            msg = f"expected an object, got {describe(value)}"
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

    path = expression.path
    plan = None
    if path is not None and len(path) <= 2:  # e.g. properties: codegen loops over it inline
        plan = ObjectPlan(list(path), key_pattern, (keep, ints_as_text), convert)
    return CompiledField(spec, compute_object, expression.source, plan)


def _scalar(spec: FieldSpec, expression: Expression) -> CompiledField:
    """A text or timestamp field: a plain path inlined, an expression written as code."""
    name = spec.name
    get = expression.search
    convert = _SCALAR_CONVERTERS.get(spec.kind, to_text)
    path = expression.path
    if path is not None and len(path) <= 2:
        compute = _plain_scalar(path, convert, name, expression.source)
        plain = PlainPlan(list(path), convert, convert is to_text)
        return CompiledField(spec, compute, expression.source, plain)

    def compute_scalar(record: dict) -> t.Any:
        value = get(record)
        if value is None:
            return None
        try:
            return convert(value)
        except ValueError as exc:
            raise MappingRejection(str(exc), name, expression.source) from None

    written = ExpressionPlan(expression.tree, convert, convert is to_text) if expression.tree else None
    return CompiledField(spec, compute_scalar, expression.source, written)


def _plain_scalar(
    path: list[str], convert: Callable[[t.Any], t.Any], name: str, source: str
) -> Callable[[dict], t.Any]:
    """A scalar field read from ``record[a]`` or ``record[a][b]``: one call per record.

    The most common shape of all (ids, customers, times): the lookup and the common
    string case are inlined. The record itself is always an object here.
    """
    first = path[0]
    second = path[1] if len(path) == 2 else None
    is_text = convert is to_text

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
