"""Fan-out, the pure part: several mappings on one stream, their ids, the checks at start."""

from __future__ import annotations

import json
import random

import pytest

from target_usage_billing.destinations.m3ter import M3terDestination
from target_usage_billing.destinations.metronome import MetronomeDestination
from target_usage_billing.errors import ConfigError
from target_usage_billing.mapping import (
    MappingRejection,
    StreamPlan,
    check_id_collisions,
    compile_rules,
    derive_id,
    find_rules,
    patterns_overlap,
)

M3TER_SPECS = M3terDestination.field_specs({})
FIELDS = {"account": "account", "ts": "at", "measure": {"n": "tokens"}}
RECORD = {"id": 7, "account": "a0", "at": 1795184129, "tokens": 7}
# Ids today's code (before fan-out, commit 23e1d2d) derives for RECORD on stream "usage":
# they must never change, or a resumed run would bill everything again under new ids.
ID_FROM_KEYS = "10577fed-1c5f-597f-984d-f475c95e68aa"  # key property "id"
ID_FROM_RECORD = "da1691c5-bf60-5176-b9b7-c0e14dde74b5"  # no key properties


def m3ter_rules(*rules: dict) -> list:
    return compile_rules(list(rules), M3TER_SPECS, M3terDestination.presets, "m3ter")


def meter(meter_name: str, **rule: object) -> dict:
    return {"stream": "usage", "fields": {**FIELDS, "meter": f"'{meter_name}'"}, **rule}


def plan(rules: list, stream: str = "usage") -> StreamPlan:
    return StreamPlan(find_rules(rules, stream))


# --- ids ---------------------------------------------------------------------------------


def test_a_lone_mapping_derives_the_ids_it_derived_before_fan_out():
    (rule,) = m3ter_rules(meter("requests"))
    assert rule.apply(RECORD, "usage", ("id",))["uid"] == ID_FROM_KEYS
    assert rule.apply(RECORD, "usage", ())["uid"] == ID_FROM_RECORD
    assert derive_id("usage", RECORD, ("id",)) == ID_FROM_KEYS
    lone = plan([rule])
    assert not lone.fans_out and lone.apply is None  # the sink calls rule.apply, as before


def test_the_first_mapping_keeps_its_ids_and_later_ones_add_their_name_or_index():
    rules = m3ter_rules(meter("requests"), meter("tokens", name="tokens"), meter("seconds"))
    both = plan(rules)
    first, second, third = both.apply(RECORD, "usage", ("id",))
    assert first["uid"] == ID_FROM_KEYS  # adding a meter to a stream changes no id it had
    assert second["uid"] == derive_id("usage", RECORD, ("id",), mapping="tokens")
    assert third["uid"] == derive_id("usage", RECORD, ("id",), mapping=2)  # no name: its index
    assert len({first["uid"], second["uid"], third["uid"]}) == 3
    assert [p["meter"] for p in (first, second, third)] == ["requests", "tokens", "seconds"]
    # a name and an index that read alike are still different ids
    assert derive_id("usage", RECORD, (), mapping="2") != derive_id("usage", RECORD, (), mapping=2)


def test_fifty_mappings_on_one_stream_give_fifty_payloads_with_distinct_ids():
    rules = m3ter_rules(*[meter(f"m{i}", name=f"m{i}", filter="tokens != null") for i in range(50)])
    fifty = plan(rules)
    payloads = fifty.apply(RECORD, "usage", ("id",))
    assert [p["meter"] for p in payloads] == [f"m{i}" for i in range(50)]
    assert len({p["uid"] for p in payloads}) == 50
    assert payloads[0]["uid"] == ID_FROM_KEYS
    # the shared filter is one term of the generated function, tested once per record
    assert fifty.apply.source.splitlines()[1].strip() == "c0 = None"  # type: ignore[union-attr]
    assert fifty.apply(dict(RECORD, tokens=None), "usage", ()) == (None,) * 50


# --- the generated function against each mapping alone --------------------------------------

FILTERS = [
    None,
    "type == 'track'",
    "type == 'track' && event == 'A'",
    "type == 'track' && event == 'B'",
    "event == 'A' || tokens > `3`",
    "!(type == 'track') && tokens",
    "length(event) > `0`",  # outside the written subset: the filter's own closure
    "type == 'track' && length(event) > `0`",
]


def random_record(rng: random.Random) -> dict:
    return {
        "id": rng.randrange(5),
        "type": rng.choice(["track", "identify", None]),
        "event": rng.choice(["A", "B", "", None, 5]),  # 5: length() fails on a number
        "tokens": rng.choice([0, 2, 5, None, "x"]),  # "x": measure.n is rejected
        "account": rng.choice(["a1", None]),  # None: the required account is missing
        "at": 1795184122,
    }


def test_the_generated_fan_out_answers_as_each_mapping_alone():
    rng = random.Random(24)
    for _trial in range(40):
        chosen = rng.sample(FILTERS, rng.randint(2, 5))
        raw = [meter(f"m{i}", name=f"m{i}", **({"filter": f} if f else {})) for i, f in enumerate(chosen)]
        for rule in raw[1::2]:  # a field only some mappings compute (it fails on tokens "x")
            rule["fields"] = {**rule["fields"], "cost": {"usd": "tokens"}}
        rules = m3ter_rules(*raw)
        fanned = plan(rules)
        assert "_shared(" in fanned.apply.source  # type: ignore[union-attr]  # alike fields once
        alone = [
            rule.generate(id_tag=tag) for rule, tag in zip(fanned.rules, fanned.id_tags)
        ]  # each mapping with its own filter, as a lone function
        for _record in range(30):
            record = random_record(rng)
            outcomes = fanned.apply(record, "usage", ("id",))
            for one, outcome in zip(alone, outcomes):
                try:
                    expected = one(record, "usage", ("id",))
                except MappingRejection as rejection:
                    assert isinstance(outcome, MappingRejection), (chosen, record)
                    assert str(outcome) == str(rejection)
                    continue
                assert outcome == expected, (chosen, record)
                assert list(outcome or ()) == list(expected or ())  # field order: the same body


def test_one_mappings_rejection_leaves_the_others_payload():
    rules = m3ter_rules(meter("requests"), meter("tokens", name="tokens", fields={**FIELDS, "meter": "kind"}))
    first, second = plan(rules).apply(RECORD, "usage", ())
    assert first["meter"] == "requests"
    assert isinstance(second, MappingRejection) and second.field == "meter"


def test_shared_filter_terms_are_computed_once():
    rules = m3ter_rules(
        meter("a", filter="type == 'track' && event == 'A'"),
        meter("b", name="b", filter="type == 'track' && event == 'B'"),
        meter("c", name="c", filter="type == 'track'"),
    )
    source = plan(rules).apply.source  # type: ignore[union-attr]
    assert "c0 = c1 = c2 = None" in source  # three distinct terms for four uses
    assert source.count("c0 := ") == 3 and source.count("c1 := ") == 1


# --- which mappings fire ---------------------------------------------------------------------


def test_every_matching_mapping_fires_up_to_the_first_matching_skip_rule():
    rules = m3ter_rules(
        meter("first", stream="usage_*"),
        meter("second", stream="*"),
        {"stream": "audit*", "skip": True},
        meter("third", stream="*_daily"),
    )
    assert [r.index for r in find_rules(rules, "usage_daily")] == [0, 1, 3]
    assert [r.index for r in find_rules(rules, "other")] == [1]
    audit = plan(rules, "audit_daily")  # "*" fires, then the skip rule ends the list
    assert [r.index for r in audit.rules] == [1] and not audit.skip
    skipped = m3ter_rules({"stream": "audit*", "skip": True}, meter("x", stream="*"))
    gone = plan(skipped, "audit_log")  # a skip rule matching first removes the stream entirely
    assert gone.skip and [r.index for r in gone.rules] == [0]
    assert find_rules(m3ter_rules(meter("x", stream="usage_*")), "events") == []


@pytest.mark.parametrize(
    ("first", "second", "overlap"),
    [
        ("usage", "usage", True),
        ("usage", "events", False),
        ("*", "anything", True),
        ("usage_*", "*_daily", True),
        ("usage_*", "events_*", False),
        ("a?c", "abc", True),
        ("a?c", "abcd", False),
        ("seg*", "*ents", True),
        ("[ab]x", "cx", True),  # a class is taken as any character: a possible overlap
        ("x*y", "x", False),
    ],
)
def test_stream_patterns_overlap(first, second, overlap):
    assert patterns_overlap(first, second) is overlap
    assert patterns_overlap(second, first) is overlap


# --- collisions and names at start ----------------------------------------------------------


def test_two_mappings_with_one_explicit_id_on_one_stream_stop_the_run_at_start():
    rules = m3ter_rules(
        meter("requests", fields={**FIELDS, "meter": "'requests'", "uid": "messageId"}),
        meter("tokens", name="tokens", stream="usa*", fields={**FIELDS, "meter": "'t'", "uid": "messageId"}),
    )
    with pytest.raises(ConfigError) as caught:
        check_id_collisions(rules)
    message = str(caught.value)
    assert "mappings[0] (stream 'usage') and mappings[1] 'tokens' (stream 'usa*')" in message
    assert "same id expression 'messageId'" in message
    assert "join('-', [messageId, 'tokens'])" in message


def test_presets_giving_two_mappings_one_id_are_a_collision_too():
    rules = compile_rules(
        [
            {"stream": "segment_events", "preset": "segment"},
            {"stream": "segment_events", "name": "copy", "preset": "segment"},
        ],
        MetronomeDestination.field_specs({}),
        MetronomeDestination.presets,
        "metronome",
    )
    with pytest.raises(ConfigError, match="same id expression 'messageId'"):
        check_id_collisions(rules)


@pytest.mark.parametrize(
    "second",
    [
        {"uid": "join('-', [messageId, 'tokens'])"},  # its own id
        {"uid": "messageId", "stream": "other"},  # never the same stream
        {"uid": "messageId", "filter": "event == 'B'"},  # never the same record
        {},  # a derived id
    ],
)
def test_mappings_that_cannot_send_one_id_twice_start(second):
    stream = second.pop("stream", "usage")
    filter_ = second.pop("filter", None)
    rules = m3ter_rules(
        meter("a", filter="event == 'A'", fields={**FIELDS, "meter": "'a'", "uid": "messageId"}),
        meter("b", name="b", stream=stream, fields={**FIELDS, "meter": "'b'", **second}),
    )
    if filter_:
        rules = m3ter_rules(
            meter("a", filter="event == 'A'", fields={**FIELDS, "meter": "'a'", "uid": "messageId"}),
            meter("b", name="b", filter=filter_, fields={**FIELDS, "meter": "'b'", **second}),
        )
    check_id_collisions(rules)  # no error


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["tokens", "tokens"], "mappings[1].name: 'tokens' already names mappings[0]"),
        (["", None], "mappings[0].name: give a short name"),
        (["has space", None], "mappings[0].name: give a short name"),
        ([7, None], "mappings[0].name: give a short name"),
    ],
)
def test_mapping_names_are_checked(names, expected):
    raw = [meter(f"m{i}", **({"name": n} if n is not None else {})) for i, n in enumerate(names)]
    with pytest.raises(ConfigError) as caught:
        m3ter_rules(*raw)
    assert expected in str(caught.value)


def test_a_skip_rule_may_carry_a_name():
    (rule,) = m3ter_rules({"stream": "audit", "skip": True, "name": "audit"})
    assert rule.skip and rule.label == "audit"


def test_derived_ids_are_text_of_rfc_4122_version_5_uuids():
    import hashlib
    import uuid

    from target_usage_billing.mapping.ids import ID_NAMESPACE

    rng = random.Random(5)
    for _ in range(2000):
        record = {"k": rng.random(), "s": "x" * rng.randrange(5)}
        stream = f"s{rng.randrange(10)}"
        hasher = hashlib.sha1(ID_NAMESPACE.bytes + stream.encode() + b"\x00")
        hasher.update(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
        expected = str(uuid.UUID(bytes=hasher.digest()[:16], version=5))
        assert derive_id(stream, record, ()) == expected


def test_null_drops_a_presets_id_so_the_second_mapping_derives_its_own():
    rules = compile_rules(
        [
            {"stream": "segment_events", "preset": "segment"},
            {
                "stream": "segment_events",
                "name": "copy",
                "preset": "segment",
                "fields": {"transaction_id": None},
            },
        ],
        MetronomeDestination.field_specs({}),
        MetronomeDestination.presets,
        "metronome",
    )
    check_id_collisions(rules)  # the second gives no id expression: no collision
    event = {
        "type": "track",
        "messageId": "m-1",
        "event": "API Request",
        "timestamp": "2026-11-20T10:00:00Z",
        "context": {"groupId": "acct"},
        "properties": {"requests": 1},
    }
    first, second = plan(rules, "segment_events").apply(event, "segment_events", ())
    assert first["transaction_id"] == "m-1"
    assert second["transaction_id"] == derive_id("segment_events", event, (), mapping="copy")


@pytest.mark.parametrize(
    "filter_source",
    [
        " || ".join(f"type == 'e{i}'" for i in range(200)),  # too deep for Python's compiler inline
        "!" * 250 + "(type == 'x')",
    ],
)
def test_a_filter_too_large_to_write_inline_is_tested_by_its_closure_with_the_same_answers(filter_source):
    import jmespath

    rules = m3ter_rules(
        meter("requests", filter="type == 'e3'"), meter("tokens", name="tokens", filter=filter_source)
    )
    fanned = plan(rules)
    assert "_filter1(record)" in fanned.apply.source  # type: ignore[union-attr]
    rng = random.Random(25)
    kinds = [f"e{i}" for i in range(0, 400, 7)] + ["e3", "x", None]
    fired = 0
    for _ in range(300):
        record = {**RECORD, "type": rng.choice(kinds)}
        first, second = fanned.apply(record, "usage", ("id",))
        assert (first is not None) == (record["type"] == "e3")
        assert (second is not None) == (jmespath.search(filter_source, record) is True), record
        fired += second is not None
    assert 0 < fired < 300
