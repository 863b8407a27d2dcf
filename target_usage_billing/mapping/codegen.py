"""A mapping rule compiled to one Python function (generated source), for the hot path.

``CompiledRule.apply_generic`` walks the rule's fields and calls one closure per field;
that dispatch is most of the mapping's cost. Here the same rule becomes the source of a
single function: plain paths (``a``, ``a.b``) are inlined dict lookups with the common
string case inline, comparisons and ``&&``/``||``/``!`` are written as Python
expressions (ExpressionWriter), keys that read fields of one object (``properties.*``) find that
object once, whole numbers and strings are kept without a call, and everything else
calls the field's own closure. Answers and rejections are those of ``apply_generic``
(the test suite compares the two on generated rules and records).

Pure: no I/O; the generated source holds only names and ``repr()`` literals. Each
function's source is kept in ``linecache`` under its file name (``<mapping rule N>``,
N the rule's index in ``mappings``), so a traceback through it shows its lines; the
function carries it as ``apply.source`` and ``apply.filename`` (the run logs both at
DEBUG).
"""

from __future__ import annotations

import collections
import linecache
import threading
import typing as t

from target_usage_billing.mapping.coerce import describe
from target_usage_billing.mapping.expression_code import ANY, BOOL, ExpressionWriter
from target_usage_billing.mapping.plans import (
    ChildrenPlan,
    ExpressionPlan,
    FieldCode,
    FilterCode,
    Kept,
    KeyedPlan,
    ObjectPlan,
    PlainPlan,
)

INDENT = "        "


def generate_apply(
    fields: list[FieldCode],
    filter_expression: FilterCode | None,
    helpers: dict[str, t.Any],
    *,
    name: str = "mapping rule",
) -> t.Callable[..., t.Any]:
    """The rule as one function ``apply(record, stream, key_properties=())``.

    ``helpers`` gives ``MappingRejection``, ``derive_id``, ``is_truthy`` and the
    JMESPath operators ``jmespath_equals``, ``jmespath_order`` and ``jmespath_not``.

    An expression written out may be more than Python's compiler takes (a filter of 200
    alternatives nests 200 conditionals: "too many nested parentheses"): then the
    function calls each field's and the filter's own closures instead (the field-by-field
    path, same answers). ``name``: what its file name says (``<name>``, see register_source).
    """
    try:
        return _generate(fields, filter_expression, helpers, inline=True, name=name)
    except (SyntaxError, RecursionError, MemoryError):
        return _generate(fields, filter_expression, helpers, inline=False, name=name)


_filenames: dict[tuple[str, str], str] = {}  # (name, source) -> its file name
_variants: collections.Counter[str] = collections.Counter()  # sources registered per name
_registry_lock = threading.Lock()


def register_source(name: str, source: str) -> str:
    """The file name ``source`` is compiled under, its lines kept in ``linecache``.

    ``<name>``; another source under a name already taken (another configuration in the
    same process) gets ``<name #2>`` and so on, so a traceback never shows another
    function's lines. The same source under the same name is registered once: memory
    grows with distinct rules, not with how often they are compiled (once per stream
    under fan-out). The entry has no modification time, so ``linecache.checkcache``
    (which tracebacks call) keeps it.
    """
    with _registry_lock:
        filename = _filenames.get((name, source))
        if filename is None:
            _variants[name] += 1
            count = _variants[name]
            filename = f"<{name}>" if count == 1 else f"<{name} #{count}>"
            _filenames[(name, source)] = filename
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        return filename


def compile_source(name: str, source: str, namespace: dict[str, t.Any], function: str) -> t.Any:
    """``function`` defined by ``source`` (built from names and repr() literals only),
    compiled under its registered file name; it carries ``source`` and ``filename``."""
    filename = register_source(name, source)
    exec(compile(source + "\n", filename, "exec"), namespace)
    defined = namespace[function]
    defined.source = source  # for debugging: print(rule.apply.source)
    defined.filename = filename
    return defined


def _generate(
    fields: list[FieldCode],
    filter_expression: FilterCode | None,
    helpers: dict[str, t.Any],
    *,
    inline: bool,
    name: str,
) -> t.Callable[..., t.Any]:
    namespace: dict[str, t.Any] = dict(helpers)
    writer = ExpressionWriter(namespace)
    where: list[tuple[str | None, str | None]] = []  # (field, expression) by position, for failures
    lines = ["def apply(record, stream, key_properties=()):", "    at = 0", "    try:"]
    if filter_expression is not None:
        where.append(("filter", filter_expression.source))
        written = writer.write(filter_expression.tree) if inline and filter_expression.tree else None
        if written is None:
            namespace["_filter"] = filter_expression.search
            written = ("_filter(record)", ANY)
        code, kind = written
        if kind is BOOL:
            lines += [f"{INDENT}if not {code}:", f"{INDENT}    return None"]
        else:
            lines += [
                f"{INDENT}matched = {code}",
                f"{INDENT}if matched is not True and not is_truthy(matched):",
                f"{INDENT}    return None",
            ]
    lines.append(f"{INDENT}payload = {{}}")
    for number, field in enumerate(fields):
        position = len(where)
        where.append((field.name, field.source))
        lines.append(f"{INDENT}at = {position}")
        plan = field.inline if inline else None
        if isinstance(plan, ChildrenPlan):
            lines += _children_code(number, field, plan, namespace)
            continue
        if isinstance(plan, KeyedPlan):
            lines += _keyed_code(number, field, plan, namespace)
            continue
        written = writer.write(plan.tree) if isinstance(plan, ExpressionPlan) else None
        if isinstance(plan, PlainPlan):
            lines += _plain_code(number, field, plan, namespace)
        elif isinstance(plan, ObjectPlan):
            lines += _object_code(number, field, plan, namespace)
        elif isinstance(plan, ExpressionPlan) and written is not None:
            lines.append(f"{INDENT}value = {written[0]}")
            lines += _converted(number, field, plan.convert, plan.is_text, namespace)
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
    for number, field in enumerate(fields):
        if field.default is not None:
            namespace[f"_default{number}"] = field.default
            lines += [
                f"{INDENT}if {field.name!r} not in payload:",
                f"{INDENT}    payload[{field.name!r}] = _default{number}",
            ]
    lines += [
        f"{INDENT}return payload",
        "    except MappingRejection:",
        "        raise",
        "    except Exception as exc:  # e.g. a JMESPath function given the wrong type",
        "        name, source = _where[at]",
        "        raise MappingRejection(f'expression failed: {exc}', name, source) from None",
    ]
    namespace["_where"] = where
    return t.cast(t.Callable[..., t.Any], compile_source(name, "\n".join(lines), namespace, "apply"))


def _converting(
    indent: str, target: str, helper: str, argument: str, label: str, source: str | None
) -> list[str]:
    """``target = helper(argument)``, a ValueError becoming the field's rejection: written
    inline (a try costs nothing until it raises) rather than wrapping each converter in
    a closure, which cost a call per value."""
    return [
        f"{indent}try:",
        f"{indent}    {target} = {helper}({argument})",
        f"{indent}except ValueError as exc:",
        f"{indent}    raise MappingRejection(str(exc), {label}, {source!r}) from None",
    ]


def _plain_code(number: int, field: FieldCode, plan: PlainPlan, namespace: dict) -> list[str]:
    keys = plan.keys
    lines = [f"{INDENT}value = record.get({keys[0]!r})"]
    if len(keys) == 2:
        lines.append(f"{INDENT}value = value.get({keys[1]!r}) if type(value) is dict else None")
    return lines + _converted(number, field, plan.convert, plan.is_text, namespace)


def _converted(
    number: int, field: FieldCode, convert: t.Callable, is_text: bool, namespace: dict
) -> list[str]:
    """``value`` converted to the field's kind (text kept as it is without a call)."""
    helper = f"_convert{number}"
    namespace[helper] = convert
    label = repr(field.name)
    lines = [f"{INDENT}if value is not None:"]
    if is_text:
        lines += [
            f"{INDENT}    if type(value) is str:",
            f"{INDENT}        if not value or value.isspace():",
            f"{INDENT}            value = None",
            f"{INDENT}    else:",
            *_converting(INDENT + "        ", "value", helper, "value", label, field.source),
        ]
    else:
        lines += _converting(INDENT + "    ", "value", helper, "value", label, field.source)
    return lines


def _store_item(
    indent: str,
    key: str,
    helper: str,
    kept: Kept,
    namespace: dict,
    rejection: tuple[str, str | None],
) -> list[str]:
    """``out[key] = item`` converted: types the converter returns unchanged are kept
    without a call (``kept`` is mapping._kept_as_is: those types, and whether whole
    numbers become their text). ``key`` is Python source; ``rejection`` is the (label
    source, expression) a conversion failure names."""
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
        f"{indent}    out[{key}] = item",
    ]
    if ints_as_text:
        lines += [f"{indent}elif kind is int:", f"{indent}    out[{key}] = str(item)"]
    label, source = rejection
    lines += [f"{indent}else:", *_converting(indent + "    ", f"out[{key}]", helper, "item", label, source)]
    return lines


def _missing_map(indent: str, field: FieldCode) -> list[str]:
    return [
        f"{indent}raise MappingRejection('required value is missing or empty', "
        f"{field.name!r}, {field.source!r})"
    ]


def _keyed_code(number: int, field: FieldCode, plan: KeyedPlan, namespace: dict) -> list[str]:
    """A map whose every key reads a plain path (``{"user": "userId"}``)."""
    kept, convert = plan.kept, plan.convert
    lines = [f"{INDENT}out = {{}}"]
    for index, (key, path, source, label) in enumerate(plan.entries):
        helper = f"_convert{number}_{index}"
        namespace[helper] = convert
        lines.append(f"{INDENT}item = record.get({path[0]!r})")
        if len(path) == 2:
            lines.append(f"{INDENT}item = item.get({path[1]!r}) if type(item) is dict else None")
        lines.append(f"{INDENT}if item is not None:")
        lines += _store_item(INDENT + "    ", repr(key), helper, kept, namespace, (repr(label), source))
    lines += [f"{INDENT}if out:", f"{INDENT}    payload[{field.name!r}] = out"]
    if field.required:
        lines += [f"{INDENT}else:", *_missing_map(INDENT + "    ", field)]
    return lines


def _children_code(number: int, field: FieldCode, plan: ChildrenPlan, namespace: dict) -> list[str]:
    """A map whose every key reads a field of one object (``properties.*``)."""
    parent, children, kept, convert = plan
    lines = [
        f"{INDENT}base = record.get({parent!r})",
        f"{INDENT}if isinstance(base, dict):",
        f"{INDENT}    out = {{}}",
    ]
    for index, (key, child, source, label) in enumerate(children):
        helper = f"_convert{number}_{index}"
        namespace[helper] = convert
        lines += [f"{INDENT}    item = base.get({child!r})", f"{INDENT}    if item is not None:"]
        lines += _store_item(INDENT + "        ", repr(key), helper, kept, namespace, (repr(label), source))
    lines += [f"{INDENT}    if out:", f"{INDENT}        payload[{field.name!r}] = out"]
    if field.required:  # no map field is required today; keep the generic rule anyway
        lines += [f"{INDENT}    else:", *_missing_map(INDENT + "        ", field)]
        lines += [f"{INDENT}else:", *_missing_map(INDENT + "    ", field)]
    return lines


def _object_code(number: int, field: FieldCode, plan: ObjectPlan, namespace: dict) -> list[str]:
    """``value``: a map given as one plain path to an object (``properties``), its keys
    copied in a loop, each value converted as the field's closure (fields._object) would;
    None when absent or empty."""
    keys, key_pattern, kept, convert = plan
    helper = f"_convert{number}"
    namespace[helper] = convert
    namespace["describe"] = describe
    name, source = field.name, field.source
    label = "f" + repr(_braces(name) + ".{key}")  # f'properties.{key}'
    lines = [f"{INDENT}value = record.get({keys[0]!r})"]
    if len(keys) == 2:
        lines.append(f"{INDENT}value = value.get({keys[1]!r}) if type(value) is dict else None")
    lines += [
        f"{INDENT}if value is not None:",
        f"{INDENT}    if not isinstance(value, dict):",
        f"{INDENT}        raise MappingRejection(f'expected an object, got {{describe(value)}}', "
        f"{name!r}, {source!r})",
        f"{INDENT}    out = {{}}",
        f"{INDENT}    for key, item in value.items():",
    ]
    if key_pattern is not None:
        namespace[f"_key_pattern{number}"] = key_pattern.match
        message = "f" + repr(f"key {{key!r}} is not a valid data-field code ({_braces(key_pattern.pattern)})")
        lines += [
            f"{INDENT}        if not (isinstance(key, str) and _key_pattern{number}(key)):",
            f"{INDENT}            raise MappingRejection({message}, {label}, {source!r})",
        ]
    lines += [f"{INDENT}        if item is None:", f"{INDENT}            continue"]
    lines += _store_item(INDENT + "        ", "key", helper, kept, namespace, (label, source))
    lines.append(f"{INDENT}    value = out or None")
    return lines


def _braces(text: str) -> str:
    """``text`` as the literal part of an f-string."""
    return text.replace("{", "{{").replace("}", "}}")
