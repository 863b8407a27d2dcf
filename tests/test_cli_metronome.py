"""The real CLI against the real sandbox: Singer in, Metronome events out."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

from target_usage_billing.sandbox.samples import singer_lines
from tests.helpers import run_target, singer
from tests.platforms import METRONOME_TOKEN, metronome_config


def instant(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def track_records(lines: list[str]) -> dict[str, dict]:
    records = [json.loads(line)["record"] for line in lines if '"RECORD"' in line]
    return {r["messageId"]: r for r in records if r["type"] == "track"}


def test_segment_preset_events_arrive_once_gzipped_in_requests_of_100(sandbox, tmp_path):
    lines = list(singer_lines(1500, seed=3))
    result = run_target(tmp_path, metronome_config(sandbox), lines)
    assert result.returncode == 0, result.stderr
    expected = track_records(lines)
    items = {item["transaction_id"]: item for item in sandbox.items("metronome")}
    stats = sandbox.stats("metronome")
    assert len(items) == len(expected) == stats["items_received"]
    assert stats["max_items_per_request"] == 100
    assert stats["gzip_requests"] == stats["requests"]  # compressed on the wire
    for message_id, record in expected.items():
        event = items[message_id]
        assert event["customer_id"] == record["context"]["groupId"]
        assert event["event_type"] == record["event"]
        assert event["timestamp"].endswith("Z")
        assert instant(event["timestamp"]) == instant(record["timestamp"])
        # numbers as exact decimal strings by default (Metronome's advice)
        properties = event["properties"]
        assert set(properties) == set(record["properties"])
        for key, value in record["properties"].items():
            if isinstance(value, (int, float)):
                assert isinstance(properties[key], str)
                assert Decimal(properties[key]) == Decimal(str(value))
            else:
                assert properties[key] == value


def test_numbers_as_numbers_and_gzip_off(sandbox, tmp_path):
    lines = list(singer_lines(300, seed=4))
    config = metronome_config(sandbox, metronome_numbers_as_strings=False, metronome_gzip=False)
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats("metronome")
    assert stats["gzip_requests"] == 0
    raw = b"\n".join(sandbox.raw_items("metronome"))
    assert b'"requests":1,' in raw
    assert b'"requests":"1"' not in raw


def test_events_outside_the_time_window_are_rejected_locally(sandbox, tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    times = {
        "ok": now - dt.timedelta(days=2),
        "old": now - dt.timedelta(days=40),
        "ahead": now + dt.timedelta(days=2),
    }
    records = [
        {"id": name, "customer": "c", "at": moment.isoformat(), "n": 1} for name, moment in times.items()
    ]
    config = metronome_config(
        sandbox,
        dead_letter_path="dead.jsonl",
        max_rejected_ratio=1,
        mappings=[
            {
                "stream": "usage",
                "fields": {
                    "transaction_id": "id",
                    "customer_id": "customer",
                    "event_type": "'api'",
                    "timestamp": "at",
                    "properties": {"n": "n"},
                },
            }
        ],
    )
    result = run_target(tmp_path, config, singer("usage", records))
    assert result.returncode == 0, result.stderr
    assert [item["transaction_id"] for item in sandbox.items("metronome")] == ["ok"]
    assert sandbox.stats("metronome")["rejected_requests"] == 0  # no request failed for them
    dead = {d["record"]["id"]: d for d in map(json.loads, (tmp_path / "dead.jsonl").read_text().splitlines())}
    assert "more than 34 days in the past" in dead["old"]["reason"]
    assert "more than 24 hours in the future" in dead["ahead"]["reason"]
    assert dead["old"]["stage"] == "validation"
    assert dead["old"]["payload"]["transaction_id"] == "old"


def test_api_rejections_are_isolated_by_bisecting(sandbox, tmp_path):
    lines = list(singer_lines(1000, seed=5))
    expected = track_records(lines)
    bad = sorted(expected)[::97][:4]  # four events the API will refuse
    sandbox.faults(refuse_items_containing=bad)
    config = metronome_config(sandbox, dead_letter_path="dead.jsonl")
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 0, result.stderr
    delivered = {item["transaction_id"] for item in sandbox.items("metronome")}
    assert delivered == set(expected) - set(bad)
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert sorted(d["record"]["messageId"] for d in dead) == bad
    assert all(d["stage"] == "api" and "refused" in d["reason"] for d in dead)
    stats = sandbox.stats("metronome")
    batches = -(-len(expected) // 100)
    # each bad event costs about 2*log2(100) extra requests at most
    assert stats["requests"] <= batches + len(bad) * 2 * 7


def test_bad_token_exits_nonzero_with_one_clear_line(sandbox, tmp_path):
    config = metronome_config(sandbox, metronome_api_token="not-the-token-123")
    result = run_target(tmp_path, config, list(singer_lines(10)))
    assert result.returncode != 0
    assert len(result.error_lines) == 1
    assert "Metronome refused the API token" in result.error_lines[0]
    assert "not-the-token-123" not in result.stderr + result.stdout
    assert METRONOME_TOKEN not in result.stderr + result.stdout
    assert sandbox.stats("metronome")["requests"] == 0  # the probe failed before any ingest


def test_token_revoked_mid_run_is_fatal_with_a_clear_line(sandbox, tmp_path):
    # The credentials probe passes, then every ingest is answered 403.
    sandbox.faults({"kind": "403", "count": 1000, "destination": "metronome"})
    result = run_target(tmp_path, metronome_config(sandbox), list(singer_lines(500, seed=6)))
    assert result.returncode != 0
    assert len(result.error_lines) == 1
    assert "Metronome refused the API token (403" in result.error_lines[0]
    assert result.states == []  # nothing was acknowledged, so no STATE
    assert sandbox.stats("metronome")["stored"] == 0


def test_20000_segment_events_delivered_exactly_once(sandbox, tmp_path):
    lines = list(singer_lines(20_000, seed=12))
    result = run_target(tmp_path, metronome_config(sandbox), lines)
    assert result.returncode == 0, result.stderr
    expected = track_records(lines)
    items = sandbox.items("metronome")
    stats = sandbox.stats("metronome")
    assert len(items) == len(expected) == stats["items_received"]
    assert {item["transaction_id"] for item in items} == set(expected)
    assert stats["max_items_per_request"] <= 100
    assert all(item["timestamp"].endswith("Z") for item in items)
    assert f"sent {len(expected)} events" in result.stderr
