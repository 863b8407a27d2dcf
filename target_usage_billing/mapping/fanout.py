"""Fan-out: every mapping whose stream pattern and filter match a record bills it.

One API call can be usage for two meters (requests and tokens), or go to two platforms'
shapes during a migration. The mappings that fire on one stream (``find_rules``) become
a ``StreamPlan``: one generated function that tests each trigger once per record (the
``&&`` terms of the filters, shared between mappings, are computed at most once),
computes the fields several mappings compute alike once, and assembles each matching
mapping's payload (or calls its own generated function without its filter).

Ids: the first mapping that fires on a stream keeps the derived ids it would have
alone; every later one adds its name (or index) to the basis (``derive_id(...,
mapping=)``), so ids cannot collide across mappings and upgrading, or adding a second
mapping to a stream, never changes the ids an existing mapping sends. Explicit id
expressions that two mappings share are refused at start (``check_id_collisions``).

Pure: no I/O; the generated source holds only names and ``repr()`` literals.
"""

from __future__ import annotations

import functools
import json
import typing as t
from collections.abc import Sequence

import jmespath

from target_usage_billing.errors import ConfigError
from target_usage_billing.mapping.codegen import compile_source, generate_apply
from target_usage_billing.mapping.expression_code import BOOL, ExpressionWriter
from target_usage_billing.mapping.expressions import field_path
from target_usage_billing.mapping.ids import derive_id
from target_usage_billing.mapping.plans import FieldCode
from target_usage_billing.mapping.rules import CODEGEN_HELPERS, CompiledRule


class StreamPlan:
    """The mappings that fire on one stream, and how one record becomes their payloads.

    ``apply(record, stream, key_properties)`` gives one outcome per mapping, in order: the
    payload, None (its filter dropped the record) or the MappingRejection (that mapping
    alone rejects the record: the others still bill it).
    """

    def __init__(self, rules: Sequence[CompiledRule]):
        self.rules = list(rules)
        self.skip = len(self.rules) == 1 and self.rules[0].skip
        self.fans_out = len(self.rules) > 1
        # Only mappings after the first get their tag in derived ids (see the module doc).
        self.id_tags: list[str | int | None] = [
            None if position == 0 else rule.id_tag for position, rule in enumerate(self.rules)
        ]
        self.apply: t.Callable[..., tuple[t.Any, ...]] | None = (
            generate_fanout(self.rules, self.id_tags) if self.fans_out else None
        )


def generate_fanout(
    rules: Sequence[CompiledRule], id_tags: Sequence[str | int | None]
) -> t.Callable[..., tuple[t.Any, ...]]:
    """One function over a stream's mappings; see StreamPlan.apply. A filter too large
    for Python's compiler (e.g. 200 ``||`` alternatives) is tested by its own closure
    instead of inline code, as a lone mapping's is (codegen.generate_apply)."""
    try:
        return _generate_fanout(rules, id_tags, inline=True)
    except (SyntaxError, RecursionError, MemoryError):
        return _generate_fanout(rules, id_tags, inline=False)


def _generate_fanout(
    rules: Sequence[CompiledRule], id_tags: Sequence[str | int | None], *, inline: bool
) -> t.Callable[..., tuple[t.Any, ...]]:
    """See generate_fanout.

    Fields that several mappings compute alike (same field, same expression) are computed
    once, by one generated function over the distinct fields, the first time a mapping
    fires on the record; each firing mapping's payload is then assembled from those
    values. When that function fails on a record (a rejection, also of a field only a
    mapping that does not fire reads) each firing mapping computes its own payload, so
    rejections are exactly the mapping's own.
    """
    namespace: dict[str, t.Any] = dict(CODEGEN_HELPERS)
    writer = ExpressionWriter(namespace)
    terms: dict[str, int] = {}  # a term's canonical tree -> its local c<N>
    shared = _shared_fields(rules)
    if shared is not None:
        keys, shared_code = shared
        shared_name = "shared fields of mapping rules " + ", ".join(str(rule.index) for rule in rules)
        namespace["_shared"] = generate_apply(shared_code, None, dict(CODEGEN_HELPERS), name=shared_name)
    lines = ["def apply_all(record, stream, key_properties=()):"]
    body: list[str] = []
    results = []
    for position, (rule, tag) in enumerate(zip(rules, id_tags)):
        namespace[f"_apply{position}"] = rule.generate(filtered=False, id_tag=tag)
        result = f"r{position}"
        results.append(result)
        tests = []
        for key, code in _terms(rule, writer if inline else None, namespace, position):
            number = terms.setdefault(key, len(terms))
            tests.append(f"((c{number} := {code}) if c{number} is None else c{number})")
        source = rule.filter.source if rule.filter is not None else None
        call = f"_apply{position}(record, stream, key_properties)"
        if shared is None:
            computed = [f"{result} = {call}"]
        else:
            namespace[f"_derive{position}"] = (
                derive_id if tag is None else functools.partial(derive_id, mapping=tag)
            )
            computed = _assembled(rule, position, keys, call, namespace)
        if not tests:
            body += ["    try:", *(f"        {line}" for line in computed)]
        else:
            body += [
                "    try:",
                f"        if {' and '.join(tests)}:",
                *(f"            {line}" for line in computed),
                "        else:",
                f"            {result} = None",
            ]
        body += ["    except MappingRejection as exc:", f"        {result} = exc"]
        if tests:
            body += [
                "    except Exception as exc:  # the filter failed on this record",
                f"        {result} = MappingRejection(f'expression failed: {{exc}}', 'filter', {source!r})",
            ]
    if terms:
        lines.append("    " + " = ".join(f"c{n}" for n in range(len(terms))) + " = None")
    if shared is not None:
        lines.append("    shared = None  # the distinct fields' values; False: they failed on this record")
    lines += body
    lines.append(f"    return ({', '.join(results)},)")
    name = "stream mappings " + ", ".join(str(rule.index) for rule in rules)
    apply_all = compile_source(name, "\n".join(lines), namespace, "apply_all")
    return t.cast(t.Callable[..., tuple[t.Any, ...]], apply_all)


def _shared_fields(
    rules: Sequence[CompiledRule],
) -> tuple[dict[tuple[str, str], str], list[FieldCode]] | None:
    """(field and source -> the key its value has in the shared function, that function's
    fields), or None when too few fields are alike for it to pay (a quarter at least)."""
    keys: dict[tuple[str, str], str] = {}
    code: list[FieldCode] = []
    total = 0
    for rule in rules:
        if len(rule.field_sources) != len(rule.code):  # pragma: no cover - compile_rules sets them
            return None
        for field, source in zip(rule.code, rule.field_sources):
            total += 1
            if (field.name, source) in keys:
                continue
            key = f"v{len(code)}"
            keys[field.name, source] = key
            # the value alone: an id left empty stays empty (each mapping derives its own),
            # defaults are each mapping's; a required field missing fails the function
            code.append(field._replace(name=key, is_id=False, default=None))
    if not total or len(code) > total * 3 // 4:
        return None
    return keys, code


def _assembled(
    rule: CompiledRule,
    position: int,
    keys: dict[tuple[str, str], str],
    call: str,
    namespace: dict[str, t.Any],
) -> list[str]:
    """Statements setting r<position> to the mapping's payload from the shared values, in
    the order and with the defaults of its own function."""
    result = f"r{position}"
    lines = [
        "if shared is None:",
        "    try:",
        "        shared = _shared(record, stream, key_properties)",
        "    except Exception:",
        "        shared = False",
        "if shared is False:",
        f"    {result} = {call}",
        "else:",
        "    try:",
        "        payload = {}",
    ]
    defaults = []
    for number, (field, source) in enumerate(zip(rule.code, rule.field_sources)):
        key = keys[field.name, source]
        lines.append(f"        value = shared.get({key!r})")
        if field.is_id:
            lines += [
                f"        payload[{field.name!r}] = value if value is not None else "
                f"_derive{position}(stream, record, key_properties)"
            ]
        else:
            lines += ["        if value is not None:", f"            payload[{field.name!r}] = value"]
        if field.default is not None:
            namespace[f"_default{position}_{number}"] = field.default
            defaults += [
                f"        if {field.name!r} not in payload:",
                f"            payload[{field.name!r}] = _default{position}_{number}",
            ]
    lines += defaults
    lines += [
        f"        {result} = payload",
        "    except Exception:  # e.g. a derived id failing: the mapping's own words for it",
        f"        {result} = {call}",
    ]
    return lines


def _terms(
    rule: CompiledRule, writer: ExpressionWriter | None, namespace: dict[str, t.Any], position: int
) -> list[tuple[str, str]]:
    """(canonical key, Python test giving True or False) for each ``&&`` term of the
    rule's filter: the filter is truthy exactly when each term is, tested left to right
    as JMESPath does. A filter outside the written subset (or with no ``writer``: not
    inline) is one term, its own closure."""
    expression = rule.filter
    if expression is None:
        return []
    if expression.tree is not None and writer is not None:
        terms = []
        for node in _conjuncts(expression.tree):
            written = writer.write(node)
            if written is None:
                break
            code, kind = written
            test = code if kind is BOOL else f"is_truthy({code})"
            terms.append((json.dumps(node, sort_keys=True, default=repr), test))
        else:
            return terms
    namespace[f"_filter{position}"] = expression.search
    return [(f"filter:{expression.source}", f"is_truthy(_filter{position}(record))")]


def _conjuncts(node: t.Any) -> list[t.Any]:
    if node["type"] == "and_expression":
        left, right = node["children"]
        return [*_conjuncts(left), *_conjuncts(right)]
    return [node]


# --- checks at start ------------------------------------------------------------------------


def check_id_collisions(rules: Sequence[CompiledRule]) -> None:
    """Two mappings that can fire on one stream with the same explicit id expression
    would send one record twice under one id (the platform keeps the first): ConfigError
    naming both, before any input is read. Filters that cannot both hold (``event ==
    'A'`` and ``event == 'B'``) make no collision."""
    mappings = [rule for rule in rules if not rule.skip and rule.id_source is not None]
    for position, first in enumerate(mappings):
        for second in mappings[position + 1 :]:
            if _canonical(first.id_source) != _canonical(second.id_source):
                continue
            if not patterns_overlap(first.stream_pattern, second.stream_pattern):
                continue
            if filters_exclusive(first, second):
                continue
            suffix = second.name or str(second.index)
            suggestion = f"join('-', [{second.id_source}, '{suffix}'])"
            msg = (
                f"{first.where} and {second.where} can both fire on one record with the same "
                f"id expression {first.id_source!r}: the platform would keep only the first of "
                f"the two payloads; give the second its own id, e.g. "
                f"{json.dumps(suggestion)}"
            )
            raise ConfigError(msg)


def _canonical(source: str | None) -> str:
    return json.dumps(jmespath.compile(source).parsed, sort_keys=True, default=repr) if source else ""


def filters_exclusive(first: CompiledRule, second: CompiledRule) -> bool:
    """Whether the two filters require one path to equal two different strings."""
    wanted = dict(_equalities(first))
    return any(path in wanted and wanted[path] != text for path, text in _equalities(second))


def _equalities(rule: CompiledRule) -> list[tuple[tuple[str, ...], str]]:
    if rule.filter is None or rule.filter.tree is None:
        return []
    found = []
    for node in _conjuncts(rule.filter.tree):
        if node["type"] != "comparator" or node["value"] != "eq":
            continue
        left, right = node["children"]
        if left["type"] == "literal":
            left, right = right, left
        path = field_path(left)
        if path is not None and right["type"] == "literal" and type(right["value"]) is str:
            found.append((tuple(path), right["value"]))
    return found


def patterns_overlap(first: str, second: str) -> bool:
    """Whether some stream name matches both glob patterns (``[...]`` classes are taken
    as any one character: a possible overlap counts as one)."""
    a, b = _glob_tokens(first), _glob_tokens(second)

    @functools.cache
    def meet(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == "*":
            return meet(i + 1, j) or (j < len(b) and meet(i, j + 1))
        if j < len(b) and b[j] == "*":
            return meet(i, j + 1) or (i < len(a) and meet(i + 1, j))
        if i == len(a) or j == len(b):
            return False
        if a[i] in ("?", "[]") or b[j] in ("?", "[]") or a[i] == b[j]:
            return meet(i + 1, j + 1)
        return False

    return meet(0, 0)


def _glob_tokens(pattern: str) -> list[str]:
    """``*``, ``?``, ``[]`` (a class) or one literal character (prefixed ``=``)."""
    tokens: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char in "*?":
            if not (char == "*" and tokens and tokens[-1] == "*"):
                tokens.append(char)
            i += 1
            continue
        if char == "[":
            end = pattern.find("]", i + 2)
            if end != -1:
                tokens.append("[]")
                i = end + 1
                continue
        tokens.append("=" + char)
        i += 1
    return tokens
