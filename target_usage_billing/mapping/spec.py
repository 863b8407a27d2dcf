"""What a destination declares of its payload fields, and a record's rejection."""

from __future__ import annotations

import enum
import re
import typing as t
from collections.abc import Mapping
from dataclasses import dataclass


class FieldKind(enum.Enum):
    ID = "id"  # idempotency key; derived when the rule gives none
    STRING = "string"
    TIMESTAMP = "timestamp"  # -> UTC ISO 8601 ending in Z
    UNIX_TIME = "unix time"  # -> seconds since 1970 UTC: an int, or decimal text with fractions
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
    # sent when the rule yields nothing (e.g. {} for an object the API requires)
    default: t.Any = None


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
