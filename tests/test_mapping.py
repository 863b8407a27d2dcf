"""Unit tests of the pure mapping module: rules, coercion, timestamps, ids, errors."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest

from target_usage_billing.destinations.m3ter import M3terDestination
from target_usage_billing.destinations.metronome import MetronomeDestination
from target_usage_billing.errors import ConfigError
from target_usage_billing.mapping import (
    MappingRejection,
    compile_expression,
    compile_rules,
    derive_id,
    encode_payload,
    find_rule,
    is_truthy,
    to_number,
    to_string,
    to_utc_timestamp,
)
from target_usage_billing.mapping.coerce import to_unix_seconds

M3TER_SPECS = M3terDestination.field_specs({})
BASE_FIELDS = {"meter": "'api'", "account": "acct", "ts": "ts"}


def m3ter_rule(fields: dict | None = None, **rule: object):
    raw = {"stream": "s", "fields": {**BASE_FIELDS, **(fields or {})}, **rule}
    return compile_rules([raw], M3TER_SPECS, M3terDestination.presets, "m3ter")[0]


def apply(rule, record: dict, keys=()):
    return rule.apply(record, "s", keys)


RECORD = {"acct": "acme", "ts": "2026-11-20T14:15:22Z"}


# --- timestamps ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-20T14:15:22Z", "2026-11-20T14:15:22Z"),
        ("2026-11-20T14:15:22.123Z", "2026-11-20T14:15:22.123Z"),
        ("2026-11-20T15:15:22+01:00", "2026-11-20T14:15:22Z"),
        ("2026-11-20T09:15:22.5-05:00", "2026-11-20T14:15:22.500Z"),
        ("2026-11-20T14:15:22.123456789Z", "2026-11-20T14:15:22.123456Z"),
        ("2026-11-20 14:15:22", "2026-11-20T14:15:22Z"),  # naive: UTC
        ("2026-11-20", "2026-11-20T00:00:00Z"),
        (dt.datetime(2026, 11, 20, 14, 15, 22, tzinfo=dt.timezone.utc), "2026-11-20T14:15:22Z"),
        (dt.datetime(2026, 11, 20, 14, 15, 22, 1), "2026-11-20T14:15:22.000001Z"),  # naive: UTC
        (
            dt.datetime(2026, 11, 20, 16, 15, 22, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2026-11-20T14:15:22Z",
        ),
        (dt.date(2026, 11, 20), "2026-11-20T00:00:00Z"),
        (1795184122, "2026-11-20T14:15:22Z"),  # epoch seconds
        (1795184122123, "2026-11-20T14:15:22.123Z"),  # epoch milliseconds
        (Decimal("1795184122.25"), "2026-11-20T14:15:22.250Z"),
        (1795184122.5, "2026-11-20T14:15:22.500Z"),
        ("1795184122", "2026-11-20T14:15:22Z"),
        ("1795184122123", "2026-11-20T14:15:22.123Z"),
    ],
)
def test_timestamps_become_utc_iso_with_z(value, expected):
    assert to_utc_timestamp(value) == expected


@pytest.mark.parametrize(
    "value", ["yesterday", "", "2026-13-45T00:00:00Z", True, {"a": 1}, [1], Decimal("NaN")]
)
def test_unparseable_timestamps_are_refused(value):
    with pytest.raises(ValueError):
        to_utc_timestamp(value)


def test_unparseable_ts_rejects_the_record_naming_field_and_expression():
    rule = m3ter_rule()
    with pytest.raises(MappingRejection) as caught:
        apply(rule, {**RECORD, "ts": "not a time"})
    assert caught.value.field == "ts"
    assert caught.value.expression == "ts"
    assert "not a time" in caught.value.reason


# --- numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (5, b"5"),
        (Decimal("0.1"), b"0.1"),
        (Decimal("12345678901234567.891"), b"12345678901234567.891"),
        (Decimal("-2.50"), b"-2.50"),
        ("0.1", b"0.1"),
        ("12345678901234567.891", b"12345678901234567.891"),
        (" 42 ", b"42"),
        ("1e3", b"1E+3"),
        (0.1, b"0.1"),
    ],
)
def test_numbers_keep_their_exact_decimal_value(value, wire):
    number = to_number(value)
    assert encode_payload({"n": number}) == b'{"n":' + wire + b"}"
    assert Decimal(wire.decode()) == Decimal(str(value).strip())


@pytest.mark.parametrize("value", ["12abc", "", "NaN", "1,000", True, {"a": 1}, [1], None, float("inf")])
def test_non_numbers_are_refused(value):
    with pytest.raises(ValueError):
        to_number(value)


def test_bad_measure_rejects_the_record_naming_the_key():
    rule = m3ter_rule({"measure": {"tokens": "n"}})
    with pytest.raises(MappingRejection) as caught:
        apply(rule, {**RECORD, "n": "lots"})
    assert caught.value.field == "measure.tokens"
    assert caught.value.expression == "n"
    assert "expected a number" in caught.value.reason


def test_measure_as_one_object_expression():
    rule = m3ter_rule({"measure": "usage"})
    payload = apply(rule, {**RECORD, "usage": {"a": Decimal("1.5"), "b": 2, "c": None}})
    assert payload["measure"] == {"a": Decimal("1.5"), "b": 2}  # null keys are left out
    with pytest.raises(MappingRejection) as caught:
        apply(rule, {**RECORD, "usage": [1, 2]})
    assert caught.value.field == "measure"


def test_data_field_codes_are_checked():
    with pytest.raises(ConfigError, match="not a valid data-field code"):
        m3ter_rule({"measure": {"1bad": "n"}})
    rule = m3ter_rule({"measure": "usage"})
    with pytest.raises(MappingRejection, match="not a valid data-field code"):
        apply(rule, {**RECORD, "usage": {"has space": 1}})


# --- strings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("x", "x"),
        (5, "5"),
        (Decimal("1.50"), "1.50"),
        (Decimal("1E+2"), "100"),
        (True, "true"),
        (False, "false"),
    ],
)
def test_string_categories_convert_numbers_and_booleans(value, text):
    assert to_string(value) == text


@pytest.mark.parametrize("value", [{"a": 1}, [1, 2]])
def test_string_categories_refuse_objects_and_arrays(value):
    with pytest.raises(ValueError):
        to_string(value)
    rule = m3ter_rule({"who": {"user": "u"}})
    with pytest.raises(MappingRejection) as caught:
        apply(rule, {**RECORD, "u": value})
    assert caught.value.field == "who.user"


# --- required fields -----------------------------------------------------------------


@pytest.mark.parametrize("missing", ["acct", "ts"])
@pytest.mark.parametrize("empty", [None, "", "   "])
def test_missing_or_empty_required_fields_reject(missing, empty):
    rule = m3ter_rule()
    record = dict(RECORD)
    if empty is None:
        del record[missing]
    else:
        record[missing] = empty
    with pytest.raises(MappingRejection) as caught:
        apply(rule, record)
    field = {"acct": "account", "ts": "ts"}[missing]
    assert caught.value.field == field
    assert caught.value.expression == missing


def test_required_field_missing_from_rule_is_a_config_error():
    with pytest.raises(ConfigError, match=r"mappings\[0\]\.fields\.meter: m3ter requires this field"):
        compile_rules([{"stream": "s", "fields": {"account": "a", "ts": "t"}}], M3TER_SPECS, {}, "m3ter")


# --- expressions, filters, rules -----------------------------------------------------


def test_expression_that_does_not_compile_names_rule_and_expression():
    with pytest.raises(ConfigError) as caught:
        m3ter_rule({"measure": {"tokens": "properties.[tokens"}})
    message = str(caught.value)
    assert "mappings[0].fields.measure.tokens" in message
    assert "'properties.[tokens'" in message


def test_unknown_field_and_unknown_key_are_config_errors():
    with pytest.raises(ConfigError, match="unknown field"):
        m3ter_rule({"metre": "'x'"})
    with pytest.raises(ConfigError, match="unknown key"):
        compile_rules([{"stream": "s", "fields": BASE_FIELDS, "map": 1}], M3TER_SPECS, {}, "m3ter")


def test_literals_and_full_jmespath():
    rule = m3ter_rule({"meter": "'fixed'", "measure": {"one": "`1`", "n": "length(items)"}})
    payload = apply(rule, {**RECORD, "items": [1, 2, 3]})
    assert payload["meter"] == "fixed"
    assert payload["measure"] == {"one": 1, "n": 3}


@pytest.mark.parametrize("expression", ["a", "a.b", 'a."odd-key"', "a.b.c"])
def test_fast_field_paths_answer_like_jmespath(expression):
    import jmespath

    compiled = compile_expression(expression, "x")
    for record in [
        {},
        {"a": None},
        {"a": 1},
        {"a": {"b": 2}},
        {"a": {"b": {"c": 3}}},
        {"a": {"odd-key": 4}},
        {"a": [1]},
    ]:
        assert compiled.search(record) == jmespath.search(expression, record)


def test_filter_keeps_truthy_records_only():
    rule = m3ter_rule(filter="type == 'track'")
    assert apply(rule, {**RECORD, "type": "identify"}) is None
    assert apply(rule, {**RECORD, "type": "track"}) is not None


@pytest.mark.parametrize(
    ("value", "truthy"),
    [(0, True), ("", False), ([], False), ({}, False), (None, False), (False, False), ("x", True)],
)
def test_jmespath_truthiness(value, truthy):
    assert is_truthy(value) is truthy


def test_find_rule_gives_the_first_matching_rule_and_globs_work():
    # (the target bills with every matching rule: find_rules, tests/test_fanout.py)
    rules = compile_rules(
        [
            {"stream": "usage_*", "fields": {**BASE_FIELDS, "meter": "'first'"}},
            {"stream": "*", "fields": {**BASE_FIELDS, "meter": "'second'"}},
        ],
        M3TER_SPECS,
        {},
        "m3ter",
    )
    assert apply(find_rule(rules, "usage_daily"), RECORD)["meter"] == "first"
    assert apply(find_rule(rules, "other"), RECORD)["meter"] == "second"
    only = compile_rules([{"stream": "usage_*", "fields": BASE_FIELDS}], M3TER_SPECS, {}, "m3ter")
    assert find_rule(only, "events") is None


# --- ids -----------------------------------------------------------------------------


def test_uid_derived_deterministically_from_key_properties():
    rule = m3ter_rule()
    first = apply(rule, {**RECORD, "id": 7, "noise": 1}, keys=("id",))["uid"]
    again = apply(rule, {**RECORD, "id": 7, "noise": 2}, keys=("id",))["uid"]
    other = apply(rule, {**RECORD, "id": 8}, keys=("id",))["uid"]
    assert first == again != other
    assert first == derive_id("s", {"id": 7}, ("id",))


def test_uid_derived_from_whole_record_without_keys_ignoring_sdc_metadata():
    rule = m3ter_rule()
    record = {**RECORD, "v": Decimal("1.5")}
    first = apply(rule, record)["uid"]
    assert apply(rule, {**record, "_sdc_received_at": "2026-11-21T00:00:00Z"})["uid"] == first
    assert apply(rule, {**record, "v": Decimal("1.6")})["uid"] != first
    # key order does not matter
    assert apply(rule, dict(reversed(list(record.items()))))["uid"] == first
    # the stream is part of the id
    assert rule.apply(record, "other", ())["uid"] != first


def test_uid_from_rule_when_given():
    rule = m3ter_rule({"uid": "messageId"})
    assert apply(rule, {**RECORD, "messageId": "m-1"})["uid"] == "m-1"


# --- whole payloads ------------------------------------------------------------------


def test_full_m3ter_payload_shape_and_encoding():
    rule = m3ter_rule(
        {
            "uid": "id",
            "ets": "end",
            "who": {"user": "user"},
            "measure": {"tokens": "tokens", "seconds": "seconds"},
            "cost": {"usd": "usd"},
        }
    )
    record = {
        **RECORD,
        "id": "u1",
        "end": 1795184182,
        "user": 42,
        "tokens": 10,
        "seconds": Decimal("0.1"),
        "usd": "12345678901234567.891",
    }
    body = encode_payload(apply(rule, record))
    assert body == (
        b'{"uid":"u1","meter":"api","account":"acme","ts":"2026-11-20T14:15:22Z",'
        b'"ets":"2026-11-20T14:16:22Z","who":{"user":"42"},'
        b'"measure":{"tokens":10,"seconds":0.1},"cost":{"usd":12345678901234567.891}}'
    )
    json.loads(body)  # valid JSON


def test_metronome_properties_numbers_as_strings_or_numbers():
    for as_strings, expected in [(True, b'"0.1"'), (False, b"0.1")]:
        specs = MetronomeDestination.field_specs({"metronome_numbers_as_strings": as_strings})
        rule = compile_rules(
            [{"stream": "s", "preset": "segment"}], specs, MetronomeDestination.presets, "metronome"
        )[0]
        record = {
            "type": "track",
            "messageId": "m1",
            "event": "API Request",
            "context": {"groupId": "acme"},
            "timestamp": dt.datetime(2026, 11, 20, 14, 15, 22, tzinfo=dt.timezone.utc),
            "properties": {"x": Decimal("0.1"), "nested": {"when": dt.datetime(2026, 1, 1)}, "flag": True},
        }
        payload = rule.apply(record, "s", ())
        body = encode_payload(payload)
        assert b'"x":' + expected in body
        assert payload["properties"]["nested"]["when"] == "2026-01-01T00:00:00Z"
        assert payload["properties"]["flag"] is True
        assert payload["transaction_id"] == "m1"
        assert payload["timestamp"] == "2026-11-20T14:15:22Z"


def test_preset_fields_are_overridden_by_the_rule():
    raw = {"stream": "s", "preset": "segment", "fields": {"meter": "'m'", "account": "userId"}}
    rule = compile_rules([raw], M3TER_SPECS, M3terDestination.presets, "m3ter")[0]
    record = {
        "type": "track",
        "messageId": "m1",
        "userId": "u1",
        "context": {"groupId": "g"},
        "timestamp": "2026-11-20T14:15:22Z",
    }
    payload = rule.apply(record, "s", ())
    assert payload["account"] == "u1"
    assert payload["uid"] == "m1"
    assert rule.apply({**record, "type": "page"}, "s", ()) is None  # preset filter


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown preset 'segmnt'"):
        m3ter_rule(preset="segmnt")


COMPILED_SUBSET = [
    "type == 'track'",
    "type != 'track'",
    "'track' == type",
    "'track' != @.type",
    "type == 'track' && event == 'API Request'",
    "event == 'Tokens Consumed' && 'llm_tokens' || 'api_requests'",
    "n > `1`",
    "n >= `0`",
    "n < `1.5`",
    "n <= m",
    "!flag",
    "!n",
    "!(type == 'track')",
    "flag || `false`",
    "a.b == `2`",
    "@.type",
    'a == `{"b": 2}`',
    "n == `true`",
    "n == `1`",
    "`null`",
    "a.b.c || 'fallback'",
    "items && items[0]",  # index expressions fall back to the interpreter
]
RECORDS = [
    {},
    {"type": "track", "event": "API Request", "n": 1, "m": 2, "flag": True, "a": {"b": 2}},
    {"type": "track", "event": "Tokens Consumed", "n": 0, "flag": False, "a": {"b": {"c": 0}}},
    {"type": "identify", "n": Decimal("1.5"), "m": Decimal("1.5"), "flag": [], "a": [1]},
    {"type": None, "n": True, "flag": "", "items": [5]},
    {"type": "track", "n": "x", "m": "y", "flag": {}, "a": {"b": None}},
    {"n": 0.0, "flag": 0, "items": []},
]


@pytest.mark.parametrize("expression", COMPILED_SUBSET)
def test_compiled_expressions_answer_exactly_like_jmespath(expression):
    import jmespath

    compiled = compile_expression(expression, "x")
    for record in RECORDS:
        try:
            expected = jmespath.search(expression, record)
        except Exception as exc:
            with pytest.raises(type(exc)):
                compiled.search(record)
            continue
        got = compiled.search(record)
        assert got == expected and type(got) is type(expected), (record, got, expected)


def written_function(expression: str):
    """The expression as codegen writes it into a generated rule: one Python expression."""
    import jmespath

    from target_usage_billing.mapping import is_truthy, jmespath_not, jmespath_order
    from target_usage_billing.mapping.expression_code import ExpressionWriter

    namespace = {
        "is_truthy": is_truthy,
        "jmespath_order": jmespath_order,
        "jmespath_not": jmespath_not,
        "jmespath_equals": jmespath.visitor.TreeInterpreter.COMPARATOR_FUNC["eq"],
    }
    written = ExpressionWriter(namespace).write(jmespath.compile(expression).parsed)
    if written is None:
        return None
    exec(f"def search(record):\n    return {written[0]}\n", namespace)
    return namespace["search"]


def random_expression(rng, depth: int = 0) -> str:
    """Expressions of the subset codegen writes as Python, nested at random."""
    leaves = [
        "type",
        "n",
        "m",
        "flag",
        "a.b",
        "a.b.c",
        "@",
        "'track'",
        "''",
        "`1`",
        "`0`",
        "`true`",
        "`null`",
        "`1.5`",
        "`[1]`",
        "`{}`",
    ]
    if depth > 2 or rng.random() < 0.35:
        return rng.choice(leaves)
    left, right = random_expression(rng, depth + 1), random_expression(rng, depth + 1)
    return rng.choice(
        [
            f"({left} == {right})",
            f"({left} != {right})",
            f"({left} < {right})",
            f"({left} >= {right})",
            f"({left} && {right})",
            f"({left} || {right})",
            f"!({left})",
            f"({left} && 'x' || {right})",
        ]
    )


@pytest.mark.parametrize("expression", COMPILED_SUBSET)
def test_written_expressions_answer_exactly_like_jmespath(expression):
    search = written_function(expression)
    if search is None:
        assert "[" in expression  # only index expressions are left to the closure
        return
    for record in RECORDS:
        assert_same_answer(search, expression, record)


def assert_same_answer(search, expression: str, record: dict) -> None:
    import jmespath

    try:
        expected = jmespath.search(expression, record)
    except Exception as exc:  # e.g. '>' between text and a number: both fail alike
        with pytest.raises(type(exc)):
            search(record)
        return
    got = search(record)
    assert got == expected and type(got) is type(expected), (expression, record, got, expected)


def test_generated_expressions_written_as_python_answer_like_jmespath():
    import random

    rng = random.Random(1121)
    checked = 0
    for _ in range(400):
        expression = random_expression(rng)
        search = written_function(expression)
        assert search is not None, expression
        for record in RECORDS:
            assert_same_answer(search, expression, record)
            checked += 1
    assert checked == 400 * len(RECORDS)


def test_an_expression_failing_on_a_record_rejects_that_record():
    rule = m3ter_rule({"measure": {"n": "length(n)"}})
    with pytest.raises(MappingRejection) as caught:
        apply(rule, {**RECORD, "n": 5})
    assert (caught.value.field, caught.value.expression) == ("measure.n", "length(n)")
    assert "expression failed" in caught.value.reason


def test_keys_sharing_a_parent_object_answer_like_separate_paths():
    rule = m3ter_rule({"measure": {"a": "p.a", "b": "p.b"}, "who": {"u": "p.u", "v": "q.v"}})
    payload = apply(rule, {**RECORD, "p": {"a": 1, "b": None, "u": "x"}, "q": {"v": 2}})
    assert payload["measure"] == {"a": 1}
    assert payload["who"] == {"u": "x", "v": "2"}
    assert "measure" not in apply(rule, {**RECORD, "p": "not an object"})
    with pytest.raises(MappingRejection) as caught:
        apply(rule, {**RECORD, "p": {"a": "many"}})
    assert (caught.value.field, caught.value.expression) == ("measure.a", "p.a")


# --- the generated rule function answers like the generic one ------------------------

VALUES = [
    None,
    "",
    "  ",
    "text",
    "2026-11-20T14:15:22Z",
    "2026-11-20T14:15:22.5+02:00",
    "not a time",
    "12.50",
    0,
    7,
    -3,
    True,
    False,
    Decimal("1.10"),
    Decimal("1E+5000"),
    Decimal("NaN"),
    1795184122,
    {"nested": 1},
    [1, 2],
]
PATHS = ["a", "b", "o.x", "o.y", "o.z", "n.deep.er", "missing", "o"]


def random_record(rng) -> dict:
    record = {key: rng.choice(VALUES) for key in ("a", "b", "kind") if rng.random() < 0.8}
    if rng.random() < 0.8:
        record["o"] = {key: rng.choice(VALUES) for key in ("x", "y", "z") if rng.random() < 0.7}
        if rng.random() < 0.1:  # not a valid m3ter data-field code
            record["o"]["bad key"] = rng.choice(VALUES)
    elif rng.random() < 0.5:
        record["o"] = rng.choice(VALUES)
    if rng.random() < 0.3:
        record["n"] = {"deep": {"er": rng.choice(VALUES)}}
    return record


def random_rule_fields(rng) -> dict:
    def expression() -> str:
        return rng.choice(
            [
                *PATHS,
                "'lit'",
                "a || 'fallback'",
                "kind == 'x' && 'one' || 'two'",
                "kind != 'x' && a || o.x",
                "!a && 'none' || b",
                "a == b && 'same' || o.y",
                "o.x > a || 'small'",
                "to_string(a)",
            ]
        )

    fields: dict = {
        "meter": expression(),
        "account": expression(),
        "ts": rng.choice(["a", "b", "o.x", "'2026-11-20T00:00:00Z'"]),
    }
    if rng.random() < 0.5:
        fields["uid"] = rng.choice(["a", "o.x", "missing"])
    if rng.random() < 0.5:
        fields["ets"] = rng.choice(["b", "o.y"])
    for category in ("measure", "who", "cost"):
        roll = rng.random()
        if roll < 0.3:  # keys reading one parent object
            fields[category] = {f"k{i}": f"o.{c}" for i, c in enumerate(rng.sample(["x", "y", "z"], 2))}
        elif roll < 0.5:  # keys from anywhere
            fields[category] = {"k": rng.choice(PATHS), "j": rng.choice(PATHS)}
        elif roll < 0.6:  # one expression yielding an object
            fields[category] = rng.choice(["o", "n.deep", "a"])
    return fields


def outcome(function, record):
    try:
        return ("payload", function(record, "s", ("a",)))
    except MappingRejection as rejection:
        return ("rejected", rejection.reason, rejection.field, rejection.expression)


def metronome_rule_fields(rng) -> dict:
    """Metronome fields: the free-form properties object is the interesting one."""
    base = random_rule_fields(rng)
    fields: dict = {"customer_id": base["account"], "event_type": base["meter"], "timestamp": base["ts"]}
    if "uid" in base:
        fields["transaction_id"] = base["uid"]
    roll = rng.random()
    if roll < 0.3:
        fields["properties"] = {f"k{i}": f"o.{c}" for i, c in enumerate(rng.sample(["x", "y", "z"], 2))}
    elif roll < 0.6:
        fields["properties"] = {"k": rng.choice(PATHS), "j": rng.choice(PATHS)}
    elif roll < 0.8:
        fields["properties"] = rng.choice(["o", "n.deep", "a"])
    return fields


@pytest.mark.parametrize(
    ("destination", "specs", "make_fields"),
    [
        ("m3ter", M3TER_SPECS, random_rule_fields),
        ("metronome", MetronomeDestination.field_specs({}), metronome_rule_fields),
        (
            "metronome",
            MetronomeDestination.field_specs({"metronome_numbers_as_strings": False}),
            metronome_rule_fields,
        ),
    ],
)
def test_generated_rule_functions_answer_exactly_like_the_generic_path(destination, specs, make_fields):
    import random

    rng = random.Random(20261121)
    compared = 0
    for _ in range(300):
        raw = {"stream": "s", "fields": make_fields(rng)}
        if rng.random() < 0.4:
            raw["filter"] = rng.choice(
                ["kind == 'x'", "a", "!b", "o.x || b", "kind == 'x' || a == `7`", "!(o.y < `1`) && b"]
            )
        try:
            (rule,) = compile_rules([raw], specs, {}, destination)
        except ConfigError:
            continue
        for _ in range(40):
            record = random_record(rng)
            assert outcome(rule.apply, record) == outcome(rule.apply_generic, record), (raw, record)
            compared += 1
    assert compared > 5000


@pytest.mark.parametrize(
    "filter_source",
    [
        " || ".join(f"kind == 'e{i}'" for i in range(200)),  # 200 nested conditionals written out
        " && ".join(f"!(kind == 'e{i}')" for i in range(300)),
        "!" * 250 + "(kind == 'x')",
    ],
)
def test_a_large_expression_falls_back_to_the_field_by_field_path_with_the_same_answers(filter_source):
    import random

    import jmespath

    (rule,) = compile_rules(
        [{"stream": "s", "filter": filter_source, "fields": {"meter": "'m'", "account": "a", "ts": "t"}}],
        M3TER_SPECS,
        {},
        "m3ter",
    )
    rng = random.Random(20)
    kinds = [f"e{i}" for i in range(0, 400, 7)] + ["x", None]
    compared = 0
    for _ in range(300):
        record = random_record(rng)
        record["kind"] = rng.choice(kinds)
        answer = outcome(rule.apply, record)
        assert answer == outcome(rule.apply_generic, record), record
        filtered_out = answer == ("payload", None)
        assert filtered_out == (jmespath.search(filter_source, record) is not True), record
        compared += 1
    assert compared == 300
    assert "_filter(record)" in rule.apply.source  # the closure, not 200 conditionals


# --- generated code: named in tracebacks -----------------------------------------------


def test_a_traceback_through_a_rule_names_and_shows_its_generated_code():
    import re
    import traceback

    rule = m3ter_rule()
    with pytest.raises(MappingRejection) as raised:
        apply(rule, {"ts": "2026-11-20T14:15:22Z"})  # the account is required
    frame = traceback.extract_tb(raised.value.__traceback__)[-1]
    assert re.fullmatch(r"<mapping rule 0( #\d+)?>", frame.filename), frame.filename
    assert frame.filename == rule.apply.filename
    assert frame.name == "apply"
    # the line comes from linecache: the generated source, as written
    assert frame.line == "raise MappingRejection('required value is missing or empty', 'account', 'acct')"
    assert frame.line in rule.apply.source
    shown = "".join(traceback.format_exception(raised.value))
    assert f'File "{rule.apply.filename}", line {frame.lineno}, in apply' in shown
    assert "raise MappingRejection('required value is missing or empty'" in shown


def test_each_distinct_generated_source_has_its_own_file_name():
    import linecache

    first = m3ter_rule({"meter": "'a'"})
    second = m3ter_rule({"meter": "'b'"})  # rule 0 again, another source
    again = m3ter_rule({"meter": "'a'"})
    assert first.apply.filename != second.apply.filename
    assert again.apply.filename == first.apply.filename  # registered once
    for rule in (first, second):
        lines = linecache.getlines(rule.apply.filename)
        assert "".join(lines).rstrip("\n") == rule.apply.source
    linecache.checkcache()  # what tracebacks call: the sources stay
    assert linecache.getlines(first.apply.filename)


def _unix_seconds_reference(value) -> int | str:
    """Seconds since 1970 through datetime and Decimal, as to_unix_seconds once computed them."""
    moment = dt.datetime.fromisoformat(to_utc_timestamp(value)[:-1]).replace(tzinfo=dt.timezone.utc)
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    whole = delta.days * 86400 + delta.seconds
    if not delta.microseconds:
        return whole
    return str((Decimal(whole) + Decimal(delta.microseconds).scaleb(-6)).normalize())


@pytest.mark.parametrize(
    "value",
    [
        "2026-12-01T00:42:00.864Z",
        "2026-12-01T00:42:00.100Z",
        "2026-12-01T00:42:00.000Z",
        "2026-12-01T00:42:00Z",
        "2026-12-01T00:42:00.000001Z",
        "2026-12-01T02:42:00.5+02:00",
        "1969-12-31T23:59:59.500Z",  # before 1970 the fraction counts up from -1: -0.5
        "1969-12-31T23:59:59Z",
        "0001-01-01T00:00:00.000001Z",
        "9999-12-31T23:59:59.999999Z",
        "1764549720.864",
        1764549720,
        Decimal("1764549720.25"),
        dt.datetime(2026, 12, 1, 0, 42, tzinfo=dt.timezone.utc),
    ],
)
def test_unix_seconds_read_from_the_text_are_what_datetime_and_decimal_give(value):
    expected = _unix_seconds_reference(value)
    assert to_unix_seconds(value) == expected and type(to_unix_seconds(value)) is type(expected)
