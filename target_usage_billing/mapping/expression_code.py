"""JMESPath expressions written as Python source, for the generated rule functions."""

from __future__ import annotations

import typing as t

from target_usage_billing.mapping.expressions import is_truthy

# Static kinds of written expressions: BOOL is always True or False, so its truth is
# itself; ANY needs JMESPath's truthiness (is_truthy).
BOOL, ANY = "bool", "any"
_PLAIN_LITERALS = (str, int, bool, type(None))


class ExpressionWriter:
    """Writes the JMESPath subset mapping._compile_node covers as one Python expression.

    Field paths become dict lookups, comparisons against a string literal plain ``==``,
    ``&&``/``||`` conditional expressions (``:=`` keeps a value that is both tested and
    returned), so a rule like ``event == 'X' && 'a' || 'b'`` costs no call at all.
    Answers are JMESPath's: the operators' own helpers decide what is not plain.
    """

    def __init__(self, namespace: dict[str, t.Any]):
        self._namespace = namespace
        self._names = 0

    def write(self, node: t.Any) -> tuple[str, str] | None:
        """(Python expression over ``record``, BOOL or ANY), or None outside the subset."""
        return self._write(node, "record", True)

    def _name(self, prefix: str) -> str:
        self._names += 1
        return f"_{prefix}{self._names}"

    def _write(self, node: t.Any, subject: str, subject_is_dict: bool) -> tuple[str, str] | None:
        kind = node["type"]
        if kind in ("field", "subexpression"):
            return self._write_path(node, subject, subject_is_dict)
        if kind == "current":
            return subject, ANY
        if kind == "literal":
            return self._write_literal(node["value"])
        children = node.get("children", [])
        parts = [self._write(child, subject, subject_is_dict) for child in children]
        if any(part is None for part in parts):
            return None
        written = t.cast(list[tuple[str, str]], parts)
        if kind == "comparator":
            return self._write_comparator(node, written)
        if kind == "not_expression":
            ((inner, inner_kind),) = written
            return (f"(not {inner})" if inner_kind is BOOL else f"jmespath_not({inner})"), BOOL
        if kind in ("and_expression", "or_expression"):
            return self._write_logical(node, written, subject, subject_is_dict)
        return None

    def _write_path(self, node: t.Any, subject: str, subject_is_dict: bool) -> tuple[str, str] | None:
        """``a`` or ``a.b.c`` (``@`` steps skipped) as dict lookups."""
        if node["type"] == "field":
            key = node["value"]
            if subject_is_dict:
                return f"{subject}.get({key!r})", ANY
            return f"({subject}.get({key!r}) if type({subject}) is dict else None)", ANY
        children = node.get("children", [])
        if not all(child["type"] in ("field", "current") for child in children):
            return None  # e.g. (a || b).c: left to the field's closure
        code, is_dict = subject, subject_is_dict
        for child in children:
            if child["type"] == "current":
                continue  # @.a is a
            key = child["value"]
            if is_dict:
                code = f"{code}.get({key!r})"
            else:
                step = self._name("t")
                code = f"({step}.get({key!r}) if type({step} := {code}) is dict else None)"
            is_dict = False
        return code, ANY

    def _write_literal(self, value: t.Any) -> tuple[str, str]:
        if type(value) in _PLAIN_LITERALS:
            return repr(value), (BOOL if type(value) is bool else ANY)
        name = self._name("literal")
        self._namespace[name] = value
        return name, ANY

    def _write_comparator(self, node: t.Any, parts: list[tuple[str, str]]) -> tuple[str, str]:
        (left, _), (right, _) = parts
        operator = node["value"]
        if operator not in ("eq", "ne"):
            return f"jmespath_order({operator!r}, {left}, {right})", ANY
        children = node.get("children", [])
        texts = [c["value"] for c in children if c["type"] == "literal" and type(c["value"]) is str]
        if texts:  # against a string, JMESPath equality is Python's
            return f"({left} {'==' if operator == 'eq' else '!='} {right})", BOOL
        test = f"jmespath_equals({left}, {right})"
        return (test if operator == "eq" else f"(not {test})"), BOOL

    def _write_logical(
        self, node: t.Any, parts: list[tuple[str, str]], subject: str, subject_is_dict: bool
    ) -> tuple[str, str]:
        """``&&`` and ``||`` as conditional expressions."""
        kind = node["type"]
        (left, left_kind), (right, right_kind) = parts
        ternary = (
            self._ternary(node["children"][0], subject, subject_is_dict) if kind == "or_expression" else None
        )
        if ternary is not None:  # `test && 'a' || b`: JMESPath's if-then-else
            test, chosen = ternary
            return f"({chosen} if {test} else {right})", ANY
        both_bool = BOOL if left_kind is BOOL and right_kind is BOOL else ANY
        if left_kind is BOOL:
            if kind == "and_expression":
                return f"({right} if {left} else False)", both_bool
            return f"(True if {left} else {right})", both_bool
        kept = self._name("t")
        if kind == "and_expression":
            return f"({right} if is_truthy({kept} := {left}) else {kept})", ANY
        return f"({kept} if is_truthy({kept} := {left}) else {right})", ANY

    def _ternary(self, node: t.Any, subject: str, subject_is_dict: bool) -> tuple[str, str] | None:
        """(test, value) when ``node`` is ``test && literal`` with a boolean test and a
        truthy literal: its truth is the test's, so ``|| b`` needs no truthiness call."""
        if node["type"] != "and_expression":
            return None
        test_node, value_node = node["children"]
        if value_node["type"] != "literal" or not is_truthy(value_node["value"]):
            return None
        test = self._write(test_node, subject, subject_is_dict)
        value = self._write(value_node, subject, subject_is_dict)
        if test is None or value is None or test[1] is not BOOL:
            return None
        return test[0], value[0]
