"""Mapping rules: compiled from the ``mappings`` setting, matched to streams, applied."""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import typing as t
from collections.abc import Mapping, Sequence

import jmespath
import jmespath.exceptions
import jmespath.visitor as _jp

from target_usage_billing.errors import ConfigError
from target_usage_billing.mapping.codegen import generate_apply
from target_usage_billing.mapping.expressions import (
    Expression,
    compile_expression,
    field_path,
    is_truthy,
    jmespath_not,
    jmespath_order,
)
from target_usage_billing.mapping.fields import CompiledField, compile_field
from target_usage_billing.mapping.ids import derive_id
from target_usage_billing.mapping.plans import FieldCode
from target_usage_billing.mapping.spec import FieldKind, FieldSpec, MappingRejection, Preset

CODEGEN_HELPERS = {
    "MappingRejection": MappingRejection,
    "derive_id": derive_id,
    "is_truthy": is_truthy,
    "jmespath_equals": _jp.TreeInterpreter.COMPARATOR_FUNC["eq"],
    "jmespath_order": jmespath_order,
    "jmespath_not": jmespath_not,
}
# A mapping's name: shown in summaries, METRIC tags and dead letters, part of its ids.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


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
        name: str | None = None,
    ):
        self.index = index
        self.name = name
        self.stream_pattern = stream_pattern
        self._stream_regex = re.compile(fnmatch.translate(stream_pattern))
        self.filter = filter_expression
        self.skip = skip
        self.reads: list[FieldRead] = []  # set by compile_rules
        self.field_sources: list[str] = []  # set by compile_rules: each field's source as JSON
        # the payload field that carries the idempotency key (None: the platform has none)
        self.id_field = next((f.spec.name for f in fields if f.spec.kind is FieldKind.ID), None)
        # the user's expression for it (None: derived from the stream's key properties)
        self.id_source = next((f.source for f in fields if f.spec.kind is FieldKind.ID), None)
        self._plan = [
            (f.spec.name, f.compute, f.spec.required, f.spec.kind is FieldKind.ID, f.source) for f in fields
        ]
        self._defaults = [(f.spec.name, f.spec.default) for f in fields if f.spec.default is not None]
        self.code = [
            FieldCode(
                f.spec.name,
                f.source,
                f.spec.required,
                f.spec.kind is FieldKind.ID,
                f.compute,
                f.inline,
                f.spec.default,
            )
            for f in fields
        ]
        # The hot path: the same rule as one generated function (see mapping.codegen).
        self.apply = self.generate()

    def generate(self, *, filtered: bool = True, id_tag: str | int | None = None) -> t.Callable[..., t.Any]:
        """The rule as one generated function; without its filter for a stream's combined
        function (mapping.fanout tests the triggers), ``id_tag`` in its derived ids."""
        derive = derive_id if id_tag is None else functools.partial(derive_id, mapping=id_tag)
        return generate_apply(
            self.code,
            self.filter if filtered else None,
            {**CODEGEN_HELPERS, "derive_id": derive},
            name=f"mapping rule {self.index}" + ("" if filtered else " in fan-out"),
        )

    @property
    def label(self) -> str:
        """The mapping's name, else ``mappings[INDEX]``: what summaries and dead letters say."""
        return self.name if self.name is not None else f"mappings[{self.index}]"

    @property
    def id_tag(self) -> str | int:
        """What tells this mapping's derived ids apart from another's on one stream."""
        return self.name if self.name is not None else self.index

    @property
    def where(self) -> str:
        """How the user wrote the rule, for messages: ``mappings[1] (stream 'api_*')``."""
        named = f" {self.name!r}" if self.name is not None else ""
        return f"mappings[{self.index}]{named} (stream {self.stream_pattern!r})"

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
            for name, default in self._defaults:
                payload.setdefault(name, default)
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
    rules: list[CompiledRule] = []
    names: dict[str, int] = {}
    for index, raw in enumerate(raw_rules):
        rules.append(_compile_rule(index, raw, names, specs, presets, destination))
    return rules


_RULE_KEYS = {"name", "stream", "filter", "fields", "preset", "skip"}


def _compile_rule(
    index: int,
    raw: t.Any,
    names: dict[str, int],
    specs: Sequence[FieldSpec],
    presets: Mapping[str, Preset],
    destination: str,
) -> CompiledRule:
    """One rule of ``mappings``; ``names`` holds the names given so far (and gets this one's)."""
    where = f"mappings[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a rule must be an object, got {raw!r}")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        msg = (
            f"{where}: unknown key(s) {', '.join(unknown)} "
            "(allowed: name, stream, preset, filter, fields, skip)"
        )
        raise ConfigError(msg)
    name = _rule_name(raw.get("name"), where, names, index)
    stream = raw.get("stream")
    if not isinstance(stream, str) or not stream:
        raise ConfigError(f"{where}.stream: give a stream name or glob pattern")
    skip = raw.get("skip", False)
    if not isinstance(skip, bool):
        raise ConfigError(f"{where}.skip: must be true or false, got {skip!r}")
    if skip:
        if set(raw) - {"stream", "skip", "name"}:
            msg = f"{where}: a rule with skip: true maps nothing; give it only stream and skip"
            raise ConfigError(msg)
        return CompiledRule(index, stream, None, [], skip=True, name=name)
    fields_raw, filter_source = _fields_and_filter(raw, where, presets, destination)
    by_name = {spec.name: spec for spec in specs}
    bad = sorted(set(fields_raw) - set(by_name))
    if bad:
        msg = (
            f"{where}.fields: unknown field(s) {', '.join(bad)} for {destination} "
            f"(fields: {', '.join(by_name)})"
        )
        raise ConfigError(msg)
    compiled_fields = _compile_fields(fields_raw, specs, where, destination)
    filter_expression = (
        compile_expression(filter_source, f"{where}.filter") if filter_source is not None else None
    )
    rule = CompiledRule(index, stream, filter_expression, compiled_fields, name=name)
    # what each field computes, as given: fields alike in several rules of one stream
    # are computed once (mapping.fanout)
    rule.field_sources = [json.dumps(fields_raw.get(f.spec.name), sort_keys=True) for f in compiled_fields]
    rule.reads = [
        FieldRead(label, text, path, spec.required)
        for spec in specs
        if fields_raw.get(spec.name) is not None
        for label, text, path in _reads(spec.name, fields_raw[spec.name])
    ]
    return rule


def _rule_name(name: t.Any, where: str, names: dict[str, int], index: int) -> str | None:
    """The rule's ``name``, checked: short, and no other rule's."""
    if name is None:
        return None
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        msg = (
            f"{where}.name: give a short name of letters, digits, '_', '-', '.' or ':' "
            f"(e.g. 'api_requests'), got {name!r}"
        )
        raise ConfigError(msg)
    if name in names:
        msg = f"{where}.name: {name!r} already names mappings[{names[name]}]; names must differ"
        raise ConfigError(msg)
    names[name] = index
    return name


def _fields_and_filter(
    raw: dict, where: str, presets: Mapping[str, Preset], destination: str
) -> tuple[dict, t.Any]:
    """The rule's fields and filter, a preset's given first (the rule's own win)."""
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
    return fields_raw, filter_source


def _compile_fields(
    fields_raw: dict, specs: Sequence[FieldSpec], where: str, destination: str
) -> list[CompiledField]:
    """Each field the rule gives, compiled; a required one it does not give is an error."""
    compiled_fields = []
    for spec in specs:
        source = fields_raw.get(spec.name)
        fwhere = f"{where}.fields.{spec.name}"
        if source is None:
            if spec.required:
                msg = f"{fwhere}: {destination} requires this field; give an expression"
                raise ConfigError(msg)
            if spec.kind is FieldKind.ID or spec.default is not None:  # derived or defaulted by apply()
                compiled_fields.append(CompiledField(spec, lambda _record: None, None))
            continue
        compiled_fields.append(compile_field(spec, source, fwhere))
    return compiled_fields


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
            path = field_path(jmespath.compile(text).parsed)
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


def find_rules(rules: Sequence[CompiledRule], stream: str) -> list[CompiledRule]:
    """The rules that fire on ``stream``, in order: every mapping whose pattern matches,
    up to the first matching skip rule. A skip rule matching first removes the stream
    (``[skip_rule]``); one after mappings only ends the list. Empty: no rule matches."""
    found: list[CompiledRule] = []
    for rule in rules:
        if rule.matches(stream):
            if rule.skip:
                return found or [rule]
            found.append(rule)
    return found
