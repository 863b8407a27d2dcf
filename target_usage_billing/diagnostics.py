"""Mapping diagnostics: does a rule fit the stream it meets? Said once, at the start.

At SCHEMA time every plain path a rule reads is looked up in the stream's JSON Schema:
a path the schema says cannot exist stops the run for a required field (exit 2) and is
a warning for an optional one, with the closest property names. Inside open objects
(``additionalProperties``, or objects without declared properties, such as Segment's
``context`` and ``properties``) the schema cannot tell; there the first records of the
stream are looked at instead (``SampleWatch``).
"""

from __future__ import annotations

import difflib
import logging
import typing as t

from target_usage_billing.errors import StreamMappingError
from target_usage_billing.mapping import CompiledRule, FieldRead, is_truthy

logger = logging.getLogger("target-usage-billing")

# How many records of a stream are looked at for fields that are always empty.
SAMPLE_RECORDS = 100


def _closest(word: str, choices: t.Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)


def _is_open(node: dict) -> bool:
    extra = node.get("additionalProperties")
    return not node.get("properties") or extra is True or isinstance(extra, dict)


def _resolve(schema: t.Any, path: list[str]) -> tuple[int, list[str]] | None:
    """(index of the first key the schema rules out, the keys it has there), or None
    when the path may exist (declared, or inside an open object)."""
    node = schema
    for index, key in enumerate(path):
        if not isinstance(node, dict) or _is_open(node):
            return None
        properties = node["properties"]
        if key not in properties:
            return index, sorted(properties)
        node = properties[key]
    return None


def _literal_hint(read: FieldRead) -> str:
    path = read.path or []
    if len(path) == 1 and read.source == path[0] and read.source.replace("_", "").isalnum():
        return f"; text literals need single quotes: '{read.source}'"
    return ""


def check_schema(stream: str, rule: CompiledRule, schema: dict) -> list[FieldRead]:
    """Raise for a required field the schema rules out, warn for an optional one; return
    the reads the schema cannot decide (left for SampleWatch)."""
    undecided = []
    for read in rule.reads:
        if read.path is None:
            continue
        found = _resolve(schema, read.path)
        if found is None:
            if _resolve_declared(schema, read.path):
                continue
            undecided.append(read)
            continue
        index, keys = found
        missing = read.path[index]
        parent = ".".join(read.path[:index])
        where = f" in '{parent}'" if parent else ""
        close = _closest(missing, keys)
        prefix = f"{parent}." if parent else ""
        hint = f"; did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
        if not close and len(keys) <= 12:
            hint = f"; it has {', '.join(keys)}"
        msg = (
            f"{rule.where}: field '{read.label}' reads {read.source!r}, but stream '{stream}' "
            f"has no property '{missing}'{where}{hint}{_literal_hint(read)}"
        )
        if read.required:
            raise StreamMappingError(msg)
        logger.warning("%s (the field will be left out)", msg)
    return undecided


def _resolve_declared(schema: t.Any, path: list[str]) -> bool:
    """Whether the whole path is declared in the schema (nothing to watch)."""
    node = schema
    for key in path:
        properties = node.get("properties") if isinstance(node, dict) else None
        if not properties or key not in properties:
            return False
        node = properties[key]
    return True


class SampleWatch:
    """Watches a stream's first records for fields the schema could not check.

    A field empty in every one of the first SAMPLE_RECORDS records that pass the filter
    is said once, with the keys that do occur at its level; for a required field the
    run stops there (every record would be rejected anyway).
    """

    def __init__(self, stream: str, rule: CompiledRule, reads: list[FieldRead]):
        self.stream = stream
        self.rule = rule
        self.reads = reads
        self.seen = 0
        self._filled = [False] * len(reads)
        self._keys: list[set[str]] = [set() for _ in reads]

    def observe(self, record: dict) -> bool:
        """Look at one record; False once the watch is over (the caller stops calling)."""
        rule = self.rule
        if rule.filter is not None:
            try:
                if not is_truthy(rule.filter.search(record)):
                    return True
            except Exception:  # the mapping itself reports a failing filter
                return True
        self.seen += 1
        for i, read in enumerate(self.reads):
            if self._filled[i]:
                continue
            node: t.Any = record
            path = read.path or []
            for depth, key in enumerate(path):
                if not isinstance(node, dict):
                    node = None
                    break
                if depth == len(path) - 1 and len(self._keys[i]) < 200:
                    self._keys[i].update(k for k in node if isinstance(k, str))
                node = node.get(key)
            if node is not None and node != "":
                self._filled[i] = True
        if self.seen < SAMPLE_RECORDS:
            return True
        self._conclude()
        return False

    def _conclude(self) -> None:
        for i, read in enumerate(self.reads):
            if self._filled[i]:
                continue
            path = read.path or []
            parent = ".".join(path[:-1])
            keys = sorted(self._keys[i])
            close = _closest(path[-1], keys, n=1) if path else []
            level = f"'{parent}'" if parent else "the records"
            has = (
                f"{level} {'have' if not parent else 'has'} {', '.join(keys[:12])}"
                if keys
                else f"{level} never appear"
            )
            more = ", ..." if len(keys) > 12 else ""
            prefix = f"{parent}." if parent else ""
            hint = f": did you mean '{prefix}{close[0]}'?" if close else ""
            msg = (
                f"{self.rule.where}: field '{read.label}' ({read.source!r}) was empty in each of the "
                f"first {self.seen} records of stream '{self.stream}'; {has}{more}{hint}"
                f"{_literal_hint(read)}"
            )
            if read.required:
                raise StreamMappingError(msg)
            logger.warning(msg)
