"""A mapping rule compiled to one Python function (generated source), for the hot path.

``CompiledRule.apply_generic`` walks the rule's fields and calls one closure per field;
that dispatch is most of the mapping's cost. Here the same rule becomes the source of a
single function: plain paths (``a``, ``a.b``) are inlined dict lookups with the common
string case inline, keys that read fields of one object (``properties.*``) find that
object once, whole numbers and strings are kept without a call, and everything else
calls the field's own closure. Answers and rejections are those of ``apply_generic``
(the test suite compares the two on generated rules and records).

Pure: no I/O; the generated source holds only names and ``repr()`` literals.
"""

from __future__ import annotations

import typing as t

INDENT = "        "


class FieldCode(t.NamedTuple):
    """What the generator needs of one payload field."""

    name: str
    source: str | None  # the expression, for rejections
    required: bool
    is_id: bool
    compute: t.Callable[[t.Any], t.Any]  # the field's closure: the general case
    # ("plain", keys, convert, is_text) | ("keyed", [(key, keys, source, label)], kept, convert)
    # | ("children", parent, [(key, child, source, label)], kept, convert) | None
    inline: tuple | None


def generate_apply(
    fields: list[FieldCode],
    filter_search: t.Callable[[t.Any], t.Any] | None,
    filter_source: str | None,
    helpers: dict[str, t.Any],
) -> t.Callable[..., t.Any]:
    """The rule as one function ``apply(record, stream, key_properties=())``.

    ``helpers`` gives ``MappingRejection``, ``derive_id`` and ``is_truthy``.
    """
    namespace: dict[str, t.Any] = dict(helpers)
    where: list[tuple[str | None, str | None]] = []  # (field, expression) by position, for failures
    lines = ["def apply(record, stream, key_properties=()):", "    at = 0", "    try:"]
    if filter_search is not None:
        namespace["_filter"] = filter_search
        where.append(("filter", filter_source))
        lines += [
            f"{INDENT}matched = _filter(record)",
            f"{INDENT}if matched is not True and not is_truthy(matched):",
            f"{INDENT}    return None",
        ]
    lines.append(f"{INDENT}payload = {{}}")
    for number, field in enumerate(fields):
        position = len(where)
        where.append((field.name, field.source))
        lines.append(f"{INDENT}at = {position}")
        inline = field.inline
        if inline is not None and inline[0] == "children":
            lines += _children_code(number, field, inline, namespace)
            continue
        if inline is not None and inline[0] == "keyed":
            lines += _keyed_code(number, field, inline, namespace)
            continue
        if inline is not None and inline[0] == "plain":
            lines += _plain_code(number, field, inline, namespace)
        else:
            namespace[f"_compute{number}"] = field.compute
            lines.append(f"{INDENT}value = _compute{number}(record)")
        lines.append(f"{INDENT}if value is None:")
        if field.is_id:
            lines.append(f"{INDENT}    payload[{field.name!r}] = derive_id(stream, record, key_properties)")
        elif field.required:
            lines.append(
                f"{INDENT}    raise MappingRejection('required value is missing or empty', "
                f"{field.name!r}, {field.source!r})"
            )
        else:
            lines.append(f"{INDENT}    pass")
        lines.append(f"{INDENT}else:")
        lines.append(f"{INDENT}    payload[{field.name!r}] = value")
    lines += [
        f"{INDENT}return payload",
        "    except MappingRejection:",
        "        raise",
        "    except Exception as exc:  # e.g. a JMESPath function given the wrong type",
        "        name, source = _where[at]",
        "        raise MappingRejection(f'expression failed: {exc}', name, source) from None",
    ]
    namespace["_where"] = where
    code = compile("\n".join(lines) + "\n", "<mapping rule>", "exec")
    exec(code, namespace)  # the source is built above from names and repr() literals only
    apply = namespace["apply"]
    apply.source = "\n".join(lines)  # for debugging: print(rule.apply.source)
    return apply


def _rejecting(
    convert: t.Callable[[t.Any], t.Any], helpers: dict, label: str, source: str | None
) -> t.Callable:
    rejection = helpers["MappingRejection"]

    def convert_or_reject(value: t.Any) -> t.Any:
        try:
            return convert(value)
        except ValueError as exc:
            raise rejection(str(exc), label, source) from None

    return convert_or_reject


def _plain_code(number: int, field: FieldCode, inline: tuple, namespace: dict) -> list[str]:
    _kind, keys, convert, is_text = inline
    namespace[f"_convert{number}"] = _rejecting(convert, namespace, field.name, field.source)
    lines = [f"{INDENT}value = record.get({keys[0]!r})"]
    if len(keys) == 2:
        lines.append(f"{INDENT}value = value.get({keys[1]!r}) if type(value) is dict else None")
    lines.append(f"{INDENT}if value is not None:")
    if is_text:
        lines += [
            f"{INDENT}    if type(value) is str:",
            f"{INDENT}        if not value or value.isspace():",
            f"{INDENT}            value = None",
            f"{INDENT}    else:",
            f"{INDENT}        value = _convert{number}(value)",
        ]
    else:
        lines.append(f"{INDENT}    value = _convert{number}(value)")
    return lines


def _store_item(
    indent: str, key: str, helper: str, kept: tuple[frozenset, bool], namespace: dict
) -> list[str]:
    """``out[key] = item`` converted: types the converter returns unchanged are kept
    without a call (``kept`` is mapping._kept_as_is: those types, and whether whole
    numbers become their text)."""
    types, ints_as_text = kept
    if len(types) == 1:
        (only,) = types
        test = f"kind is {only.__name__}"
    else:
        namespace[f"{helper}_kept"] = types
        test = f"kind in {helper}_kept"
    lines = [
        f"{indent}kind = type(item)",
        f"{indent}if {test}:",
        f"{indent}    out[{key!r}] = item",
    ]
    if ints_as_text:
        lines += [f"{indent}elif kind is int:", f"{indent}    out[{key!r}] = str(item)"]
    lines += [f"{indent}else:", f"{indent}    out[{key!r}] = {helper}(item)"]
    return lines


def _missing_map(indent: str, field: FieldCode) -> list[str]:
    return [
        f"{indent}raise MappingRejection('required value is missing or empty', "
        f"{field.name!r}, {field.source!r})"
    ]


def _keyed_code(number: int, field: FieldCode, inline: tuple, namespace: dict) -> list[str]:
    """A map whose every key reads a plain path (``{"user": "userId"}``)."""
    _kind, entries, kept, convert = inline
    lines = [f"{INDENT}out = {{}}"]
    for index, (key, path, source, label) in enumerate(entries):
        helper = f"_convert{number}_{index}"
        namespace[helper] = _rejecting(convert, namespace, label, source)
        lines.append(f"{INDENT}item = record.get({path[0]!r})")
        if len(path) == 2:
            lines.append(f"{INDENT}item = item.get({path[1]!r}) if type(item) is dict else None")
        lines.append(f"{INDENT}if item is not None:")
        lines += _store_item(INDENT + "    ", key, helper, kept, namespace)
    lines += [f"{INDENT}if out:", f"{INDENT}    payload[{field.name!r}] = out"]
    if field.required:
        lines += [f"{INDENT}else:", *_missing_map(INDENT + "    ", field)]
    return lines


def _children_code(number: int, field: FieldCode, inline: tuple, namespace: dict) -> list[str]:
    """A map whose every key reads a field of one object (``properties.*``)."""
    _kind, parent, children, kept, convert = inline
    lines = [
        f"{INDENT}base = record.get({parent!r})",
        f"{INDENT}if isinstance(base, dict):",
        f"{INDENT}    out = {{}}",
    ]
    for index, (key, child, source, label) in enumerate(children):
        helper = f"_convert{number}_{index}"
        namespace[helper] = _rejecting(convert, namespace, label, source)
        lines += [f"{INDENT}    item = base.get({child!r})", f"{INDENT}    if item is not None:"]
        lines += _store_item(INDENT + "        ", key, helper, kept, namespace)
    lines += [f"{INDENT}    if out:", f"{INDENT}        payload[{field.name!r}] = out"]
    if field.required:  # no map field is required today; keep the generic rule anyway
        lines += [f"{INDENT}    else:", *_missing_map(INDENT + "        ", field)]
        lines += [f"{INDENT}else:", *_missing_map(INDENT + "    ", field)]
    return lines
