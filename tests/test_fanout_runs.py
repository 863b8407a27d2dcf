"""Fan-out end to end: the real CLI against the sandbox, one record billed by several mappings."""

from __future__ import annotations

import copy
import json

import pytest
import requests

from target_usage_billing.mapping import derive_id
from tests.helpers import EXAMPLES, dead_letters, run_target, singer, usage
from tests.platforms import CASES, DESTINATIONS_UNDER_TEST, USAGE_RULE_M3TER, config_for


def two_meters(destination: str) -> list[dict]:
    """The usage-row rule twice: event 'requests' (no name) and 'tokens' (named)."""
    first = copy.deepcopy(CASES[destination].usage_rule)
    second = copy.deepcopy(first)
    first["fields"][CASES[destination].event_field] = "'requests'"
    second["fields"][CASES[destination].event_field] = "'tokens'"
    second["name"] = "tokens"
    return [first, second]


def metric_points(stderr: str) -> list[dict]:
    return [json.loads(line.split("METRIC: ", 1)[1]) for line in stderr.splitlines() if "METRIC: " in line]


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_one_record_is_billed_to_two_meters_with_distinct_ids(sandbox, tmp_path, destination):
    config = config_for(destination, sandbox, mappings=two_meters(destination))
    records = usage(6)
    result = run_target(tmp_path, config, singer("usage", records, key_properties=["id"], state={"n": 6}))
    assert result.returncode == 0, result.stderr
    assert result.states == [{"n": 6}]
    stored = sandbox.items(destination)
    ids = [item[CASES[destination].id_field] for item in stored]
    assert len(stored) == 12 and len(set(ids)) == 12
    by_event: dict[str, set] = {}
    for item in stored:
        by_event.setdefault(item[CASES[destination].event_field], set()).add(
            item[CASES[destination].id_field]
        )
    # the first mapping's ids are those it derived alone; the second's add its name
    assert by_event["requests"] == {derive_id("usage", r, ["id"]) for r in records}
    assert by_event["tokens"] == {derive_id("usage", r, ["id"], mapping="tokens") for r in records}
    assert "stream usage: read 6, filtered 0, unmapped 0, sent 12" in result.stderr
    assert "mappings[0] (stream 'usage'): filtered 0, sent 6" in result.stderr
    assert "mappings[1] 'tokens' (stream 'usage'): filtered 0, sent 6" in result.stderr
    sent = {
        point["tags"]["mapping"]: point["value"]
        for point in metric_points(result.stderr)
        if point["metric"] == "usage_billing.mapping.sent"
    }
    assert sent == {"mappings[0]": 6, "tokens": 6}


def test_upgrading_a_lone_mapping_keeps_its_ids_so_a_resumed_run_bills_nothing_twice(sandbox, tmp_path):
    config = config_for("m3ter", sandbox)  # one mapping, as before fan-out
    first = run_target(tmp_path, config, singer("usage", usage(10), key_properties=["id"]))
    assert first.returncode == 0, first.stderr
    # a second meter is added; the tap re-sends rows 5..9 (an overlapping backfill)
    config["mappings"] = two_meters("m3ter")
    config["mappings"][0]["fields"]["meter"] = "'tokens'"  # the first mapping unchanged
    config["mappings"][1]["fields"]["meter"] = "'requests'"
    config["mappings"][1]["name"] = "requests"
    second = run_target(tmp_path, config, singer("usage", usage(10, start=5), key_properties=["id"]))
    assert second.returncode == 0, second.stderr
    stats = sandbox.stats("m3ter")
    assert stats["duplicates"] == 5  # rows 5..9 of the first meter: the same ids, not re-billed
    meters = [item["meter"] for item in sandbox.items("m3ter")]
    assert meters.count("tokens") == 15 and meters.count("requests") == 10


def test_fifty_mappings_on_one_stream(sandbox, tmp_path):
    rules = []
    for n in range(50):
        rule = copy.deepcopy(USAGE_RULE_M3TER)
        rule["fields"]["meter"] = f"'meter_{n}'"
        rule["name"] = f"meter_{n}"
        rules.append(rule)
    config = config_for("m3ter", sandbox, mappings=rules)
    result = run_target(tmp_path, config, singer("usage", usage(30), key_properties=["id"], state={"n": 30}))
    assert result.returncode == 0, result.stderr
    stored = sandbox.items("m3ter")
    assert len(stored) == 1500 and len({item["uid"] for item in stored}) == 1500
    assert {item["meter"] for item in stored} == {f"meter_{n}" for n in range(50)}
    assert "stream usage: read 30, filtered 0, unmapped 0, sent 1500" in result.stderr
    assert "mappings[49] 'meter_49' (stream 'usage'): filtered 0, sent 30" in result.stderr
    assert result.states == [{"n": 30}]


def test_a_state_waits_for_every_payload_of_a_record_across_batches(sandbox, tmp_path):
    # batches of 3 payloads: record 1's two payloads land in batches 1 and 2; the second
    # batch fails for good, so no STATE may cover record 1 although half of it is stored
    sandbox.faults({"kind": "503", "every": 2, "headers": {"x-should-retry": "false"}})
    config = config_for("m3ter", sandbox, mappings=two_meters("m3ter"), batch_size_rows=3)
    config["max_requests_in_flight"] = 1
    lines = singer("usage", [], key_properties=["id"])
    for n, record in enumerate(usage(4)):
        lines.append(json.dumps({"type": "RECORD", "stream": "usage", "record": record}))
        lines.append(json.dumps({"type": "STATE", "value": {"n": n + 1}}))
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 4, result.stderr
    assert result.states == [{"n": 1}]  # record 0 whole; record 1 is not all acknowledged
    stored = sandbox.items("m3ter")
    assert sorted((item["meter"], item["measure"]["tokens"]) for item in stored) == [
        ("requests", 0),
        ("requests", 1),
        ("tokens", 0),
    ]
    # resumed from that STATE, record 1 is sent again: its stored half has the same id
    requests.delete(f"{sandbox.url}/_sandbox/faults", timeout=10).raise_for_status()
    config["batch_size_rows"] = 100
    resumed = usage(3, start=1)
    again = run_target(tmp_path, config, singer("usage", resumed, key_properties=["id"], state={"n": 4}))
    assert again.returncode == 0, again.stderr
    assert again.states == [{"n": 4}]
    assert sandbox.stats("m3ter")["duplicates"] == 1  # ("requests", 1): not billed twice
    assert len(sandbox.items("m3ter")) == 8  # each of the 4 records once per meter


def test_one_mappings_dead_letter_loses_nothing_of_the_others(sandbox, tmp_path):
    rules = two_meters("m3ter")
    # record 2 lacks what "tokens" needs (a local rejection); record 3's "tokens" payload
    # is refused by the API; "requests" bills all five
    rules[1]["fields"]["account"] = "tokens_account"
    rules[1]["fields"]["metadata"] = {"note": "join('-', ['tokens', note])"}
    records = [dict(r, tokens_account=None if r["id"] == 2 else "acct") for r in usage(5)]
    sandbox.faults(refuse_items_containing=["tokens-n3"])
    config = config_for("m3ter", sandbox, mappings=rules, max_rejected_ratio=1)
    result = run_target(tmp_path, config, singer("usage", records, key_properties=["id"], state={"n": 5}))
    assert result.returncode == 0, result.stderr
    assert result.states == [{"n": 5}]  # every payload is confirmed or dead-lettered
    stored = sorted((item["meter"], item["measure"]["tokens"]) for item in sandbox.items("m3ter"))
    assert stored == [("requests", n) for n in range(5)] + [("tokens", n) for n in (0, 1, 4)]
    letters = sorted(dead_letters(tmp_path), key=lambda letter: letter["line"])
    assert [(letter["stage"], letter["mapping"], letter["keys"]) for letter in letters] == [
        ("mapping", "tokens", {"id": 2}),
        ("api", "tokens", {"id": 3}),
    ]
    assert "mappings[0] (stream 'usage'): filtered 0, sent 5 measurements, rejected 0" in result.stderr
    assert (
        "mappings[1] 'tokens' (stream 'usage'): filtered 0, sent 3 measurements, rejected 2" in result.stderr
    )


def test_same_explicit_id_on_two_mappings_stops_before_any_input(sandbox, tmp_path):
    config = json.loads((EXAMPLES / "m3ter-segment.config.json").read_text())
    second = copy.deepcopy(config["mappings"][0])
    second["name"] = "tokens"
    second["fields"]["meter"] = "'tokens'"
    config["mappings"].append(second)
    config.update(m3ter_ingest_url=sandbox.url, m3ter_auth_url=sandbox.url)
    result = run_target(tmp_path, config, EXAMPLES / "segment-events.singer.jsonl")
    assert result.returncode == 2, result.stderr
    (error,) = result.error_lines
    assert "mappings[0] (stream 'segment_events') and mappings[1] 'tokens' (stream 'segment_events')" in error
    assert "same id expression 'messageId'" in error
    assert """e.g. "join('-', [messageId, 'tokens'])\"""" in error
    assert "Traceback" not in result.stderr
    assert sandbox.stats("m3ter")["requests"] == 0
    # the suggested id runs, and bills each track call twice under distinct ids
    second["fields"]["uid"] = "join('-', [messageId, 'tokens'])"
    config["dry_run"] = True
    dry = run_target(tmp_path, config, EXAMPLES / "segment-events.singer.jsonl")
    assert dry.returncode == 0, dry.stderr
    assert "would send 600 measurements" in dry.stderr


def test_a_mapping_behind_a_skip_rule_never_fires_and_says_so(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, mappings=[{"stream": "usage", "skip": True}, USAGE_RULE_M3TER])
    result = run_target(tmp_path, config, singer("usage", usage(3), state={"n": 3}))
    assert result.returncode == 2, result.stderr
    (error,) = result.error_lines
    assert "mappings[1] (stream 'usage') fired on no stream (mappings[0] (stream 'usage') skips" in error
    assert result.states == [{"n": 3}]  # the skip is what the user asked: the run is checkpointed


def test_a_dry_run_shows_each_mappings_first_payload(tmp_path):
    config = json.loads((EXAMPLES / "m3ter-segment.config.json").read_text())
    second = copy.deepcopy(config["mappings"][0])
    second.update(name="tokens", filter="type == 'track' && properties.tokens != null")
    second["fields"].update(meter="'tokens'", uid="join('-', [messageId, 'tokens'])")
    config["mappings"][0]["name"] = "api_requests"
    config["mappings"].append(second)
    result = run_target(tmp_path, {**config, "dry_run": True}, EXAMPLES / "segment-events.singer.jsonl")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    heads = [n for n, line in enumerate(lines) if "(stream 'segment_events'): filtered" in line]
    assert len(heads) == 2
    assert "mappings[0] 'api_requests'" in lines[heads[0]] and "mappings[1] 'tokens'" in lines[heads[1]]
    first_payloads = [json.loads(lines[n + 1].split("first payload: ", 1)[1]) for n in heads]
    assert first_payloads[0]["meter"] == "api_requests"
    assert first_payloads[1]["meter"] == "tokens" and first_payloads[1]["uid"].endswith("-tokens")
    assert first_payloads[1]["uid"] == f"{first_payloads[0]['uid']}-tokens"  # the same event


def test_schema_checks_name_the_mapping_that_does_not_fit(sandbox, tmp_path):
    rules = two_meters("m3ter")
    rules[1]["fields"]["account"] = "acount"
    schema = {"type": "object", "properties": {k: {} for k in ("id", "account", "at", "tokens", "note")}}
    config = config_for("m3ter", sandbox, mappings=rules)
    result = run_target(tmp_path, config, singer("usage", usage(3), schema=schema, key_properties=["id"]))
    assert result.returncode == 2, result.stderr
    (error,) = result.error_lines
    assert "mappings[1] 'tokens' (stream 'usage'): field 'account' reads 'acount'" in error
    assert "did you mean 'account'" in error
    assert sandbox.stats("m3ter")["requests"] == 0


def test_the_readme_fan_out_example_bills_each_api_request_twice(tmp_path):
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("### Fan-out: several mappings on one stream", 1)[1]
    block = section.split("```json\n", 1)[1].split("```", 1)[0]
    mappings = json.loads("{" + block + "}")["mappings"]
    config = json.loads((EXAMPLES / "m3ter-segment.config.json").read_text())
    config.update(mappings=mappings, dry_run=True)
    result = run_target(tmp_path, config, EXAMPLES / "segment-events.singer.jsonl")
    assert result.returncode == 0, result.stderr
    (body,) = [
        json.loads(line)["body"] for line in (tmp_path / "dry-run-requests.jsonl").read_text().splitlines()
    ]
    items = body["measurements"]
    requests_ = {item["uid"] for item in items if item["meter"] == "api_requests"}
    tokens = {item["uid"] for item in items if item["meter"] == "tokens"}
    assert requests_ and {uid + "-tokens" for uid in requests_} == tokens
    assert "mappings[0] 'api_requests' (stream 'segment_events'): filtered" in result.stderr


def test_a_later_mapping_without_a_name_is_warned_about(sandbox, tmp_path):
    rules = two_meters("m3ter")
    del rules[1]["name"]
    config = config_for("m3ter", sandbox, mappings=rules)
    result = run_target(tmp_path, config, singer("usage", usage(2), key_properties=["id"]))
    assert result.returncode == 0, result.stderr
    assert "mappings[1] (stream 'usage') has no name, so its derived ids include its index 1" in result.stderr
    tokens = [item["uid"] for item in sandbox.items("m3ter") if item["meter"] == "tokens"]
    assert sorted(tokens) == sorted(derive_id("usage", r, ["id"], mapping=1) for r in usage(2))


def test_an_input_without_any_stream_is_no_error(sandbox, tmp_path):
    config = config_for("m3ter", sandbox)
    result = run_target(tmp_path, config, [json.dumps({"type": "STATE", "value": {"n": 0}})])
    assert result.returncode == 0, result.stderr
    assert result.states == [{"n": 0}]
    assert "mappings[0] (stream 'usage') matched no stream (streams: none)" in result.stderr
    assert "the input had no stream" in result.stderr


def test_the_first_records_are_watched_for_each_mapping(tmp_path):
    config = json.loads((EXAMPLES / "m3ter-segment.config.json").read_text())
    second = copy.deepcopy(config["mappings"][0])
    second.update(name="tokens")
    second["fields"].update(meter="'tokens'", uid=None, account="context.group_id")
    config["mappings"].append(second)
    result = run_target(tmp_path, {**config, "dry_run": True}, EXAMPLES / "segment-events.singer.jsonl")
    assert result.returncode == 2, result.stderr
    (error,) = result.error_lines
    assert (
        "mappings[1] 'tokens' (stream 'segment_events'): field 'account' ('context.group_id') was empty"
        in error
    )
    assert "did you mean 'context.groupId'?" in error


def test_the_in_run_conflict_check_stays_the_last_line_of_defence(sandbox, tmp_path):
    rules = two_meters("m3ter")
    rules[0]["fields"]["uid"] = "to_string(id)"
    rules[1]["fields"]["uid"] = "to_string(@.id)"  # the same id, written differently: not caught at start
    config = config_for("m3ter", sandbox, mappings=rules, max_rejected_ratio=1)
    result = run_target(tmp_path, config, singer("usage", usage(3), key_properties=["id"], state={"n": 3}))
    assert result.returncode == 0, result.stderr
    assert [item["meter"] for item in sandbox.items("m3ter")] == ["requests"] * 3
    letters = dead_letters(tmp_path)
    assert [(letter["stage"], letter["mapping"], letter["id"]) for letter in letters] == [
        ("conflict", "tokens", str(n)) for n in range(3)
    ]
    assert result.states == [{"n": 3}]


@pytest.mark.parametrize("destination", ["m3ter", "metronome"])
def test_reconcile_reads_back_each_mappings_usage_apart(sandbox, tmp_path, destination):
    config = config_for(destination, sandbox, mappings=two_meters(destination), journal_sample_rate=1)
    records = usage(20)
    result = run_target(tmp_path, config, singer("usage", records, key_properties=["id"]))
    assert result.returncode == 0, result.stderr
    confirmed = run_target(tmp_path, config, "", args=["--reconcile"])
    assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
    assert "every item checked is confirmed" in confirmed.stdout

    sandbox.reset()
    (tmp_path / "again").mkdir()  # a fresh journal
    sandbox.faults({"kind": "lost-after-ack", "every": 7, "destination": destination})
    run_target(tmp_path / "again", config, singer("usage", records, key_properties=["id"]))
    lost = set(sandbox.stats(destination)["lost_ids"])
    meter_of = {derive_id("usage", r, ["id"]): ("requests", r["account"]) for r in records}
    meter_of |= {derive_id("usage", r, ["id"], mapping="tokens"): ("tokens", r["account"]) for r in records}
    assert {meter_of[item_id][0] for item_id in lost} == {"requests", "tokens"}  # both mappings lost some
    found = run_target(tmp_path / "again", config, "", args=["--reconcile"])
    assert found.returncode == 8, found.stdout + found.stderr
    if destination == "metronome":  # read back by id: each lost id is named
        assert all(item_id in found.stdout for item_id in lost)
    else:  # totals per customer and meter: exactly the rows of the lost items are short
        rows = [line.split() for line in found.stdout.splitlines() if line.strip().startswith("a")]
        short = {(row[1], row[0]) for row in rows if row[-1] != "0"}
        assert short == {meter_of[item_id] for item_id in lost}
        assert {row[1] for row in rows} == {"requests", "tokens"}
