"""What the code generator (codegen.py) is given of a rule's fields: how each may be
written inline, as named types (one per shape), built by fields.py."""

from __future__ import annotations

import re
import typing as t

Convert = t.Callable[[t.Any], t.Any]
# what coerce.kept_as_is gives: the types a converter returns unchanged, and whether
# whole numbers become their text
Kept = tuple[frozenset, bool]


class PlainPlan(t.NamedTuple):
    """A scalar read from ``record[a]`` or ``record[a][b]``."""

    keys: list[str]
    convert: Convert
    is_text: bool  # the converter is to_text: a string is kept without a call


class ExpressionPlan(t.NamedTuple):
    """A scalar computed by an expression ExpressionWriter may write out."""

    tree: t.Any  # the parsed JMESPath expression
    convert: Convert
    is_text: bool


class KeyedEntry(t.NamedTuple):
    """One key of a map given key by key, read from a plain path."""

    key: str
    keys: list[str]  # the path it reads (one or two keys)
    source: str  # its expression, for rejections
    label: str  # "field.key", for rejections


class KeyedPlan(t.NamedTuple):
    """A map whose every key reads a plain path (``{"user": "userId"}``)."""

    entries: list[KeyedEntry]
    kept: Kept
    convert: Convert


class ChildEntry(t.NamedTuple):
    """One key of a map whose keys all read fields of one object."""

    key: str
    child: str  # the field of the shared object
    source: str
    label: str


class ChildrenPlan(t.NamedTuple):
    """A map whose every key reads a field of one object (``properties.*``)."""

    parent: str
    children: list[ChildEntry]
    kept: Kept
    convert: Convert


class ObjectPlan(t.NamedTuple):
    """A map given as one plain path to an object (``properties``), copied key by key."""

    keys: list[str]
    key_pattern: re.Pattern[str] | None  # what each key must match (m3ter data-field codes)
    kept: Kept
    convert: Convert


InlinePlan = PlainPlan | ExpressionPlan | KeyedPlan | ChildrenPlan | ObjectPlan


class FieldCode(t.NamedTuple):
    """What the generator needs of one payload field."""

    name: str
    source: str | None  # the expression, for rejections
    required: bool
    is_id: bool
    compute: t.Callable[[t.Any], t.Any]  # the field's closure: the general case
    inline: InlinePlan | None  # how it may be written inline (None: call ``compute``)
    default: t.Any = None  # sent when the rule yields no value (None: the field is left out)


class FilterCode(t.Protocol):
    """What the generator needs of a rule's filter (a mapping.Expression)."""

    source: str
    search: t.Callable[[t.Any], t.Any]
    tree: t.Any  # the parsed expression, or None
