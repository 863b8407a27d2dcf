"""The real CLI against the real sandbox: Singer in, m3ter measurements out."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest

from target_usage_billing.sandbox.samples import singer_lines
from tests.helpers import EXAMPLES, run_target, singer, usage_records
from tests.platforms import M3TER_SECRET, m3ter_config, usage_config

EXAMPLE = EXAMPLES / "segment-events.singer.jsonl"


def example_records() -> list[dict]:
    lines = EXAMPLE.read_text().splitlines()
    return [m["record"] for m in map(json.loads, lines) if m["type"] == "RECORD"]


def instant(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_example_arrives_once_with_the_right_fields(sandbox, tmp_path):
    result = run_target(tmp_path, m3ter_config(sandbox), EXAMPLE)
    assert result.returncode == 0, result.stderr
    expected = [r for r in example_records() if r["type"] == "track" and r["event"] == "API Request"]
    stored = {item["uid"]: item for item in sandbox.items("m3ter")}
    assert len(stored) == len(expected) == sandbox.stats("m3ter")["items_received"]
    for record in expected:
        item = stored[record["messageId"]]
        props = record["properties"]
        assert item["meter"] == "api_requests"
        assert item["account"] == record["context"]["groupId"]
        assert instant(item["ts"]) == instant(record["timestamp"])
        assert item["ts"].endswith("Z")
        assert item["who"] == {"user": record["userId"]}
        assert item["where"] == {"region": props["region"]}
        assert item["measure"] == {
            "requests": 1,
            "tokens": props["tokens"],
            "compute_seconds": props["compute_seconds"],
        }
        assert item["cost"] == {"usd": props["cost_usd"]}
    # the final STATE is relayed once everything was accepted
    assert result.states[-1] == {"bookmarks": {"segment_events": {"position": 500}}}
    assert "sent 300 measurements" in result.stderr


def test_exact_decimals_reach_the_api_unchanged(sandbox, tmp_path):
    lines = singer(
        "usage",
        [
            {"id": 1, "account": "a", "at": 1795184122, "tokens": 0.1},
            {"id": 2, "account": "a", "at": 1795184122, "tokens": 12345678901234567.891},
            {"id": 3, "account": "a", "at": 1795184122, "tokens": "0.30"},
        ],
    )
    # json.dumps would round 12345678901234567.891: write the line by hand
    lines[2] = lines[2].replace("1.2345678901234568e+16", "12345678901234567.891")
    result = run_target(tmp_path, usage_config(sandbox), lines)
    assert result.returncode == 0, result.stderr
    raw = b"\n".join(sandbox.raw_items("m3ter"))
    assert b'"tokens":0.1}' in raw
    assert b'"tokens":12345678901234567.891}' in raw
    assert b'"tokens":0.30}' in raw


def test_2500_records_make_3_requests(sandbox, tmp_path):
    result = run_target(tmp_path, usage_config(sandbox), singer("usage", usage_records(2500)))
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats("m3ter")
    assert stats["requests"] == 3
    assert stats["accepted"] == 2500
    assert stats["max_items_per_request"] == 1000


def test_large_records_respect_the_byte_cap(sandbox, tmp_path):
    records = usage_records(1500, note="x" * 2000)
    result = run_target(tmp_path, usage_config(sandbox), singer("usage", records))
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats("m3ter")
    assert stats["accepted"] == 1500
    assert stats["max_body_bytes"] < 512_000
    assert stats["requests"] >= 1500 * 2000 // 512_000 + 1
    assert stats["statuses"] == {"200": stats["requests"]}


def test_configured_limits_lower_the_batches(sandbox, tmp_path):
    config = usage_config(sandbox, batch_size_rows=100, batch_max_bytes=5000)
    result = run_target(tmp_path, config, singer("usage", usage_records(1000)))
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats("m3ter")
    assert stats["max_body_bytes"] <= 5000
    assert stats["max_items_per_request"] <= 100
    assert stats["accepted"] == 1000


def test_a_record_too_big_for_any_request_is_rejected_alone(sandbox, tmp_path):
    records = usage_records(3)
    records[1]["note"] = "y" * 600_000
    result = run_target(
        tmp_path,
        usage_config(sandbox, dead_letter_path="dead.jsonl", max_rejected_ratio=1),
        singer("usage", records),
    )
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("m3ter")["accepted"] == 2
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert [d["record"]["id"] for d in dead] == [1]
    assert "byte limit" in dead[0]["reason"]


@pytest.mark.parametrize(
    "faults",
    [
        [{"kind": "429", "count": 2, "retry_after": "1"}],
        [{"kind": "500", "count": 2}, {"kind": "502", "count": 1}, {"kind": "503", "count": 1}],
        [{"kind": "drop", "count": 2}],
        [{"kind": "stored-500", "count": 2}],
        [{"kind": "expire-tokens", "count": 1}],
    ],
    ids=["429-retry-after", "5xx", "dropped-connections", "stored-then-500", "token-expiry"],
)
def test_faults_are_survived_with_nothing_lost(sandbox, tmp_path, faults):
    sandbox.faults(*faults)
    result = run_target(tmp_path, usage_config(sandbox), singer("usage", usage_records(3000)))
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats("m3ter")
    assert stats["faults_applied"] >= 1
    assert stats["stored"] == 3000
    assert stats["conflicts"] == 0
    assert sorted(item["measure"]["tokens"] for item in sandbox.items("m3ter")) == list(range(3000))


def test_token_expiry_mid_run_renews_the_token(sandbox, tmp_path):
    sandbox.faults({"kind": "expire-tokens", "count": 1})
    result = run_target(tmp_path, usage_config(sandbox), singer("usage", usage_records(2000)))
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats("m3ter")
    # requests in flight may all meet the expired token; it is renewed once
    assert 1 <= stats["statuses"]["403"] <= 2
    assert stats["token_requests"] == 2
    assert stats["stored"] == 2000


def test_bad_credentials_exit_nonzero_with_one_clear_line_and_no_secret(sandbox, tmp_path):
    wrong_secret = "wrong-secret-that-must-not-leak"
    config = usage_config(sandbox, m3ter_api_secret=wrong_secret)
    result = run_target(tmp_path, config, singer("usage", usage_records(5)))
    assert result.returncode != 0
    assert len(result.error_lines) == 1
    assert "m3ter refused the credentials" in result.error_lines[0]
    assert "Traceback" not in result.stderr
    assert wrong_secret not in result.stderr + result.stdout
    assert M3TER_SECRET not in result.stderr + result.stdout
    assert sandbox.stats("m3ter")["requests"] == 0  # failed before reading input


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"destination": "orb"}, "destination"),
        ({"m3ter_api_secret": None}, "m3ter_api_secret"),
        (
            {"mappings": [{"stream": "usage", "fields": {"meter": "a.[", "account": "b", "ts": "c"}}]},
            "mappings[0].fields.meter: expression 'a.[' does not compile",
        ),
        ({"mappings": []}, "mappings"),
        ({"max_requests_in_flight": 0}, "max_requests_in_flight"),
    ],
)
def test_invalid_settings_stop_before_input_with_one_line(sandbox, tmp_path, change, expected):
    config = usage_config(sandbox)
    for key, value in change.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    result = run_target(tmp_path, config, singer("usage", usage_records(5)))
    assert result.returncode == 2
    assert len(result.error_lines) == 1, result.stderr
    assert expected in result.error_lines[0]
    assert "Traceback" not in result.stderr


def test_unmatched_streams_are_skipped_with_one_warning_when_allowed(sandbox, tmp_path):
    lines = singer("usage", usage_records(10)) + singer("other", [{"x": i} for i in range(50)])
    result = run_target(tmp_path, usage_config(sandbox, unmatched_streams="skip"), lines)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Stream 'other' matches no mapping rule") == 1
    assert sandbox.stats("m3ter")["accepted"] == 10


def test_bad_records_are_rejected_and_good_ones_delivered(sandbox, tmp_path):
    records = usage_records(100)
    records[10]["tokens"] = "many"
    records[20]["at"] = "sometime"
    del records[30]["account"]
    config = usage_config(sandbox, dead_letter_path="dead.jsonl", max_rejected_ratio=1)
    result = run_target(tmp_path, config, singer("usage", records))
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("m3ter")["accepted"] == 97
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert {d["record"]["id"]: d["field"] for d in dead} == {10: "measure.tokens", 20: "ts", 30: "account"}
    assert all(d["stage"] == "mapping" and d["stream"] == "usage" for d in dead)
    assert [d["line"] for d in dead] == [12, 22, 32]  # input line numbers (SCHEMA is line 1)
    assert "rejected 3" in result.stderr


def test_20000_segment_events_delivered_exactly_once(sandbox, tmp_path):
    lines = list(singer_lines(20_000, seed=11))
    result = run_target(tmp_path, m3ter_config(sandbox), lines)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line)["record"] for line in lines if '"RECORD"' in line]
    expected = {r["messageId"]: r for r in records if r["type"] == "track" and r["event"] == "API Request"}
    items = sandbox.items("m3ter")
    stats = sandbox.stats("m3ter")
    assert len(items) == len(expected) == stats["items_received"]
    assert {item["uid"] for item in items} == set(expected)
    assert stats["max_items_per_request"] <= 1000
    assert stats["max_body_bytes"] < 512_000
    for item in items:
        record = expected[item["uid"]]
        assert instant(item["ts"]) == instant(record["timestamp"]) and item["ts"].endswith("Z")
        assert isinstance(item["measure"]["tokens"], int)
        assert Decimal(str(item["measure"]["compute_seconds"])) == Decimal(
            str(record["properties"]["compute_seconds"])
        )
        assert isinstance(item["who"]["user"], str)


def test_fractional_settings_from_a_config_file_work(sandbox, tmp_path):
    # JSON files give Decimal numbers: every time setting must still work as seconds
    config = usage_config(
        sandbox,
        request_timeout_seconds=2.5,
        max_retry_seconds=10.5,
        state_checkpoint_seconds=0.25,
        shutdown_grace_seconds=1.5,
        progress_interval_seconds=0.05,
        max_rejected_ratio=0.5,
        max_requests_per_second=20.5,
    )
    sandbox.faults({"kind": "slow", "count": 2, "delay_ms": 300})
    result = run_target(tmp_path, config, singer("usage", usage_records(2000)))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "progress: read" in result.stderr
    assert sandbox.stats("m3ter")["stored"] == 2000
