"""The vendors' SDK request types as referees of the bodies the target writes."""

from __future__ import annotations

import datetime as dt
import json
import types
import typing as t
from pathlib import Path

import typing_extensions

from target_usage_billing.sandbox.samples import singer_lines
from tests.helpers import EXAMPLES, run_target

if t.TYPE_CHECKING:
    from tests.platforms import PlatformCase


def referee_bodies(tmp_path: Path, destination: str, *, seed: int, hours: int) -> list[list[t.Any]]:
    """The request bodies dry runs of ``destination``'s example config write: one list for
    the bundled Segment example, one for 2,000 generated events (the referees judge both)."""
    config = json.loads((EXAMPLES / f"{destination}-segment.config.json").read_text())
    mixed = list(singer_lines(2000, seed=seed, hours=hours, state_every=500))
    found = []
    for name, lines in (("example", EXAMPLES / "segment-events.singer.jsonl"), ("mixed", mixed)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        result = run_target(run_dir, {**config, "dry_run": True}, lines)
        assert result.returncode == 0, result.stderr
        written = (run_dir / "dry-run-requests.jsonl").read_text().splitlines()
        found.append([json.loads(line)["body"] for line in written])
    return found


def body_items(case: PlatformCase, bodies: list[t.Any]) -> list[t.Any]:
    """The items of request ``bodies``, taken out of the platform's envelope (if it has one)."""
    if case.envelope_key is None:
        return [item for body in bodies for item in body]
    return [item for body in bodies for item in body[case.envelope_key]]


def problems(value: t.Any, annotation: t.Any, where: str) -> list[str]:
    """Where ``value`` (decoded JSON) does not fit the SDK's type ``annotation``."""
    origin = t.get_origin(annotation)
    if origin in (typing_extensions.Required, typing_extensions.NotRequired, t.Annotated):
        return problems(value, t.get_args(annotation)[0], where)
    if origin is t.Union or isinstance(annotation, types.UnionType):
        return _union_problems(value, annotation, where)
    if annotation is t.Any:
        return []
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a whole number, got {value!r}"]
    fields = getattr(annotation, "__fields__", None)
    if (
        isinstance(annotation, type)
        and isinstance(fields, dict)
        and not typing_extensions.is_typeddict(annotation)
    ):
        return _pydantic_problems(value, annotation, fields, where)
    if typing_extensions.is_typeddict(annotation):
        return _typeddict_problems(value, annotation, where)
    if origin is dict:
        return _dict_problems(value, annotation, where)
    return _scalar_problems(value, annotation, where)


def _union_problems(value: t.Any, annotation: t.Any, where: str) -> list[str]:
    options = []
    for option in t.get_args(annotation):
        try:
            found = problems(value, option, where)
        except AssertionError:  # a type no JSON value is (e.g. Stripe's UntypedStripeObject)
            continue
        if not found:
            return []
        options.append(found)
    return min(options, key=len) if options else [f"{where}: fits none of {annotation!r}"]


def _pydantic_problems(value: t.Any, annotation: type, fields: dict, where: str) -> list[str]:
    # a pydantic (v1) model, as Lago's SDK declares its request bodies
    if not isinstance(value, dict):
        return [f"{where}: expected an object"]
    hints = t.get_type_hints(annotation)
    found = [
        f"{where}.{key}: missing (required)" for key, f in fields.items() if f.required and key not in value
    ]
    found += [f"{where}.{key}: not a field of {annotation.__name__}" for key in value if key not in hints]
    for key, item in value.items():
        if key in hints:
            found += problems(item, hints[key], f"{where}.{key}")
    return found


def _typeddict_problems(value: t.Any, annotation: t.Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: expected an object"]
    hints = typing_extensions.get_type_hints(annotation, include_extras=True)
    # with postponed annotations the class's __required_keys__ can miss Required[...]
    required = set(annotation.__required_keys__) | {
        key for key, hint in hints.items() if t.get_origin(hint) is typing_extensions.Required
    }
    found = [f"{where}.{key}: missing (required)" for key in sorted(required) if key not in value]
    found += [f"{where}.{key}: not a field of {annotation.__name__}" for key in value if key not in hints]
    for key, item in value.items():
        if key in hints:
            found += problems(item, hints[key], f"{where}.{key}")
    return found


def _dict_problems(value: t.Any, annotation: t.Any, where: str) -> list[str]:
    key_type, value_type = t.get_args(annotation)
    if not isinstance(value, dict):
        return [f"{where}: expected an object"]
    found = []
    for key, item in value.items():
        found += problems(key, key_type, f"{where} key")
        found += problems(item, value_type, f"{where}.{key}")
    return found


def _scalar_problems(value: t.Any, annotation: t.Any, where: str) -> list[str]:
    if annotation is object:
        return []
    if annotation is type(None):
        return [] if value is None else [f"{where}: expected null, got {value!r}"]
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a number, got {value!r}"]
    if annotation is str:
        return [] if isinstance(value, str) else [f"{where}: expected a string, got {value!r}"]
    if annotation is dt.datetime:
        return [f"{where}: a datetime cannot arrive as JSON"]
    raise AssertionError(f"{where}: no rule for {annotation!r}")
