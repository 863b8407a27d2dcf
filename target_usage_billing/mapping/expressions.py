"""JMESPath expressions: compiled once, the common subset as plain Python closures.

Field paths, literals, comparisons, ``&&``, ``||`` and ``!`` answer exactly as the
jmespath package does (its own helpers decide equality, ordering and truthiness);
everything else runs on the jmespath interpreter.
"""

from __future__ import annotations

import difflib
import typing as t
from collections.abc import Callable
from numbers import Number

import jmespath
import jmespath.exceptions
import jmespath.functions
import jmespath.visitor as _jp

from target_usage_billing.errors import ConfigError

# A parsed JMESPath expression: nested {"type", "children", "value"} dicts.
Node = t.Any


class Expression:
    """A compiled JMESPath expression; plain field paths skip the interpreter."""

    __slots__ = ("path", "search", "source", "tree")

    def __init__(
        self,
        source: str,
        search: Callable[[t.Any], t.Any],
        path: list[str] | None = None,
        tree: Node | None = None,
    ):
        self.source = source
        self.search = search
        self.path = path  # the keys, when the expression is a plain field path
        # the parsed expression, when it is in the subset codegen writes as Python
        self.tree = tree

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def field_path(node: Node) -> list[str] | None:
    if node["type"] == "field":
        return [node["value"]]
    if node["type"] == "subexpression":
        keys: list[str] = []
        for child in node["children"]:
            sub = field_path(child)
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


def _compile_node(node: Node) -> Callable[[t.Any], t.Any] | None:
    """A Python closure for the common JMESPath subset, None for anything else.

    Covers field paths, ``@``, literals, comparisons, ``&&``, ``||`` and ``!`` with the
    exact semantics of the jmespath package (its own helpers decide equality, ordering
    and truthiness); other expressions use the jmespath interpreter.
    """
    kind = node["type"]
    path = field_path(node)
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
        return _comparator(node, left, right)  # type: ignore[arg-type]
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


def _comparator(
    node: Node, left: Callable[[t.Any], t.Any], right: Callable[[t.Any], t.Any]
) -> Callable[[t.Any], t.Any]:
    """A comparison's closure, over its two sides' closures."""
    operator = node["value"]
    if operator not in ("eq", "ne"):
        return lambda value: jmespath_order(operator, left(value), right(value))
    text = _string_literal(node["children"])
    if text is None:
        compare = _jp.TreeInterpreter.COMPARATOR_FUNC[operator]
        return lambda value: compare(left(value), right(value))
    # Against a string, JMESPath equality is plain equality (its special case only
    # concerns 0/1 against booleans), so skip its number checks.
    other_node = node["children"][0 if node["children"][1]["type"] == "literal" else 1]
    other = left if other_node is node["children"][0] else right
    key_path = field_path(other_node)
    if key_path is not None and len(key_path) == 1:
        (key,) = key_path  # `field == 'text'`: the most common filter of all
        if operator == "eq":
            return lambda value: type(value) is dict and value.get(key) == text
        return lambda value: not (type(value) is dict and value.get(key) == text)
    if operator == "eq":
        return lambda value: other(value) == text
    return lambda value: other(value) != text


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
    return Expression(source, fast, field_path(compiled.parsed), compiled.parsed)


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


def _is_number(value: t.Any) -> bool:
    # JMESPath's notion (jmespath.visitor keeps it private): booleans are not numbers
    return value is not True and value is not False and isinstance(value, Number)


def jmespath_order(operator: str, a: t.Any, b: t.Any) -> t.Any:
    """``a < b`` and kin as JMESPath answers them: null unless both are numbers or strings."""
    if not ((_is_number(a) or isinstance(a, str)) and (_is_number(b) or isinstance(b, str))):
        return None
    return _jp.TreeInterpreter.COMPARATOR_FUNC[operator](a, b)


def jmespath_not(value: t.Any) -> bool:
    """JMESPath ``!value``."""
    if _is_number(value) and value == 0:
        return False  # JMESPath: !0 is false
    return not value


def is_truthy(value: t.Any) -> bool:
    """JMESPath truthiness: false, null, '', [] and {} are false; 0 is true."""
    if value is None or value is False:
        return False
    if isinstance(value, (str, list, dict)):
        return len(value) > 0
    return True
