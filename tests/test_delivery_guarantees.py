"""Delivery guarantees with real processes: crashes, signals, outages, faults, bad input."""

from __future__ import annotations

import json
import signal
import time

import pytest
import requests

from tests.helpers import Pipeline, position, run_target, singer, stamp, wait_until
from tests.platforms import (
    CASES,
    DESTINATIONS_UNDER_TEST,
    USAGE_RULE_M3TER,
    crash_config,
    m3ter_config,
)

# Record 0's time for crash tests: fixed for both runs of a test so that a re-emitted
# record is byte-identical; yesterday (inside Metronome's 34-day window), or three hours
# ago for Orb (inside its 12-hour grace period): ``PlatformCase.crash_base_ago``.
STARTED = int(time.time())  # CASES[...].crash_base_ago counts back from here


def now_config(sandbox, destination: str, **overrides) -> dict:
    """``destination``'s example config with a usage-row rule stamping "now_ts" (an hour
    ago) where the platform has a time window, "at" for m3ter."""
    case = CASES[destination]
    return case.config(sandbox, mappings=[case.usage_rule_now], **overrides)


def stored_ids(sandbox, destination: str) -> list[int]:
    category = CASES[destination].note_field
    return sorted(int(item[category]["note"][1:]) for item in sandbox.items(destination))


# --- crashes -----------------------------------------------------------------------------


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
@pytest.mark.parametrize("kill_after_requests", [1, 6, 15])
def test_sigkill_then_resume_from_last_state_loses_nothing_and_resends_identically(
    sandbox, tmp_path, kill_after_requests, destination
):
    total = 2000
    sandbox.faults(latency_ms=60)  # keep requests in flight when the kill lands
    config = crash_config(sandbox, destination)
    base = STARTED - CASES[destination].crash_base_ago
    first = Pipeline(tmp_path, config, total, every=50, pause=0.02, name="first", base_epoch=base)
    wait_until(lambda: sandbox.stats(destination)["requests"] >= kill_after_requests)
    first.kill()
    states = first.states
    positions = [position(s) for s in states]
    assert positions == sorted(positions), "STATE never goes backwards"
    stored_at_kill = sandbox.stats(destination)["stored"]
    # every STATE emitted covers only acknowledged records
    assert not positions or positions[-1] <= stored_at_kill
    resume = states[-1] if states else None
    second = Pipeline(tmp_path, config, total, state=resume, every=50, name="second", base_epoch=base)
    assert second.wait() == 0, second.stderr
    stats = sandbox.stats(destination)
    assert stored_ids(sandbox, destination) == list(range(total)), "every record stored exactly once"
    assert stats["conflicts"] == 0, "a re-sent id always carries the same body"
    assert position(second.states[-1]) == total


def test_sigkill_after_input_ended_while_draining(sandbox, tmp_path):
    total = 600
    sandbox.faults(latency_ms=400)
    config = crash_config(sandbox, max_requests_in_flight=2)
    first = Pipeline(tmp_path, config, total, every=50, name="first")
    wait_until(lambda: first.tap.poll() is not None)  # the tap finished writing
    wait_until(lambda: sandbox.stats("m3ter")["requests"] >= 2)
    first.kill()
    resume = first.states[-1] if first.states else None
    assert position(resume) < total  # the kill landed before everything was acknowledged
    sandbox.faults(latency_ms=0)
    second = Pipeline(tmp_path, config, total, state=resume, every=50, name="second")
    assert second.wait() == 0, second.stderr
    assert sandbox.stats("m3ter")["stored"] == total
    assert sandbox.stats("m3ter")["conflicts"] == 0


def test_state_progresses_during_a_long_run(sandbox, tmp_path):
    config = crash_config(sandbox, state_checkpoint_seconds=0.2)
    run = Pipeline(tmp_path, config, 1500, every=100, pause=0.05)
    assert run.wait() == 0, run.stderr
    positions = [position(s) for s in run.states]
    assert len(positions) >= 3
    assert positions == sorted(set(positions))  # increasing, no repeats, never empty
    assert positions[-1] == 1500


# --- signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_sigterm_mid_run_delivers_what_was_received_and_exits_zero(sandbox, tmp_path, destination):
    config = crash_config(sandbox, destination, shutdown_grace_seconds=20)
    run = Pipeline(
        tmp_path,
        config,
        100_000,
        every=100,
        pause=0.05,
        base_epoch=STARTED - CASES[destination].crash_base_ago,
    )
    wait_until(lambda: sandbox.stats(destination)["stored"] >= 300)
    run.target.send_signal(signal.SIGTERM)
    code = run.wait()
    assert code == 0, run.stderr
    assert "Received SIGTERM" in run.stderr
    stored = sandbox.stats(destination)["stored"]
    last = position(run.states[-1])
    assert 300 <= last <= stored < 100_000
    # everything before the last STATE is in the store, once
    assert stored_ids(sandbox, destination)[:last] == list(range(last))
    assert sandbox.stats(destination)["conflicts"] == 0


def test_sigterm_during_an_outage_exits_nonzero_after_the_grace_period(sandbox, tmp_path):
    config = crash_config(sandbox, shutdown_grace_seconds=1, max_retry_seconds=300)
    run = Pipeline(tmp_path, config, 100_000, every=50, pause=0.05)
    wait_until(lambda: sandbox.stats("m3ter")["stored"] >= 200)
    sandbox.faults({"kind": "503", "every": 1})  # from now on every request fails
    wait_until(lambda: sandbox.stats("m3ter")["statuses"].get("503", 0) >= 2)
    started = time.monotonic()
    run.target.send_signal(signal.SIGTERM)
    code = run.wait(timeout=60)
    assert code == 7, run.stderr
    assert time.monotonic() - started < 30
    error = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "stopped before everything received was delivered" in error[0]
    stored = sandbox.stats("m3ter")["stored"]
    assert position(run.states[-1]) <= stored


def test_outage_longer_than_the_retry_budget_is_a_clear_fatal_error(sandbox, tmp_path):
    config = crash_config(sandbox, max_retry_seconds=2)
    run = Pipeline(tmp_path, config, 5000, every=100, pause=0.02)
    wait_until(lambda: sandbox.stats("m3ter")["stored"] >= 300)
    sandbox.faults({"kind": "503", "every": 1})
    code = run.wait(timeout=120)
    assert code == 4, run.stderr
    error = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(error) == 1
    assert "retry budget" in error[0] and "503" in error[0]
    assert "Traceback" not in run.stderr
    stored = sandbox.stats("m3ter")["stored"]
    assert 300 <= position(run.states[-1]) <= stored


# --- faults ------------------------------------------------------------------------------

ALL_FAULTS = [
    {"kind": "429", "count": 2, "retry_after": "1"},
    {"kind": "429", "count": 1, "retry_after": "Sat, 01 Jan 2000 00:00:00 GMT"},
    {"kind": "500", "count": 1},
    {"kind": "502", "count": 1},
    {"kind": "503", "count": 1},
    {"kind": "504", "count": 1},
    {"kind": "drop", "count": 2},
    {"kind": "stored-500", "count": 2},
    {"kind": "stored-drop", "count": 1},
    {"kind": "slow", "count": 1, "delay_ms": 2500},
]


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_all_faults_together_lose_nothing(sandbox, tmp_path, destination):
    expiring = destination in ("m3ter", "stripe")  # OAuth tokens, meter event sessions
    faults = ALL_FAULTS + ([{"kind": "expire-tokens", "count": 1}] if expiring else [])
    sandbox.faults(*faults)
    now = stamp(3600)
    records = [
        {"id": i, "account": f"a{i % 5}", "at": 1795184122 + i, "now_ts": now, "tokens": i, "note": f"n{i}"}
        for i in range(1500)
    ]
    config = now_config(sandbox, destination, request_timeout_seconds=1)
    result = run_target(tmp_path, config, singer("usage", records, key_properties=["id"]))
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats(destination)
    assert stats["faults_applied"] >= len(faults)
    assert stats["stored"] == 1500
    assert stats["conflicts"] == 0
    assert stats["duplicates"] >= 1  # lost acknowledgements were re-sent, and de-duplicated


# --- bad records and limits --------------------------------------------------------------


def bad_mix(count: int, bad_every: int, destination: str = "m3ter") -> list[dict]:
    now = stamp(3600)
    records = []
    for i in range(count):
        record = {
            "id": i,
            "account": f"a{i % 5}",
            "at": 1795184122 + i,
            "now_ts": now,
            "tokens": i,
            "note": f"n{i}",
        }
        if i % bad_every == 0:
            kind = (i // bad_every) % 3
            if kind == 0 and destination == "m3ter":
                record["tokens"] = "lots"  # m3ter measures are numbers
            elif kind == 0 and destination in ("orb", "stripe"):
                record["account"] = ["a", "b"]  # a customer id is text
            elif kind == 0:
                record["account"] = None  # Metronome needs a customer (properties are free-form)
            elif kind == 1:
                record["at"] = record["now_ts"] = "not a time"
            else:
                record["account"] = ""
        records.append(record)
    return records


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_bad_record_mix_under_the_limit_delivers_all_good_ones(sandbox, tmp_path, destination):
    records = bad_mix(3000, bad_every=50, destination=destination)  # 2 % bad
    bad_ids = {r["id"] for r in records if r["id"] % 50 == 0}
    config = now_config(sandbox, destination, dead_letter_path="dead.jsonl")
    if destination == "metronome":
        config["metronome_numbers_as_strings"] = False
    result = run_target(tmp_path, config, singer("usage", records, key_properties=["id"], state={"done": 1}))
    assert result.returncode == 0, result.stderr
    assert sandbox.stats(destination)["stored"] == 3000 - len(bad_ids)
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert {d["record"]["id"] for d in dead} == bad_ids
    for d in dead:
        # Orb's customer id is optional in the mapping (one of two) and Stripe's sits in
        # the payload map: an empty one is refused when the payload is checked
        late = destination in ("orb", "stripe") and d["record"]["account"] == ""
        assert d["reason"] and d["stage"] == ("validation" if late else "mapping"), d
    assert result.states == [{"done": 1}]
    assert f"rejected {len(bad_ids)}" in result.stderr


def test_bad_record_mix_over_the_limit_stops_checkpoints_and_exits_6(sandbox, tmp_path):
    good = [{"id": i, "account": "a", "at": 1795184122 + i, "tokens": i, "note": "n"} for i in range(2000)]
    bad = [{"id": 5000 + i, "account": "a", "at": "never", "tokens": i, "note": "n"} for i in range(500)]
    lines = (
        singer("usage", good, key_properties=["id"], state={"bookmarks": {"usage": {"position": 2000}}})
        + singer("usage", bad, key_properties=["id"])[1:]
        + singer("usage", good[:10], key_properties=["id"])[1:]
    )
    config = m3ter_config(
        sandbox, mappings=[USAGE_RULE_M3TER], dead_letter_path="dead.jsonl", max_rejected_ratio=0.1
    )
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 6, result.stderr
    assert len(result.error_lines) == 1 and "max_rejected_ratio=0.1" in result.error_lines[0]
    assert sandbox.stats("m3ter")["stored"] == 2000  # what came before was delivered
    assert result.states == [{"bookmarks": {"usage": {"position": 2000}}}]  # and checkpointed
    dead = (tmp_path / "dead.jsonl").read_text().splitlines()
    assert 200 < len(dead) <= 500  # stopped reading once over the limit


def test_max_rejected_records_count_limit(sandbox, tmp_path):
    records = bad_mix(1000, bad_every=100)  # 10 bad
    config = m3ter_config(sandbox, mappings=[USAGE_RULE_M3TER], max_rejected_records=5, max_rejected_ratio=1)
    result = run_target(tmp_path, config, singer("usage", records))
    assert result.returncode == 6
    assert "over max_rejected_records=5" in result.error_lines[0]


# --- bad input ---------------------------------------------------------------------------


def test_malformed_json_line_stops_with_the_line_number_after_checkpointing(sandbox, tmp_path):
    good = [{"id": i, "account": "a", "at": 1795184122 + i, "tokens": i, "note": "n"} for i in range(300)]
    lines = singer("usage", good, state={"bookmarks": {"usage": {"position": 300}}})
    lines.append('{"type": "RECORD", "stream": "usage", "record": {"id": 1')  # line 303
    lines += singer("usage", good)[1:]
    result = run_target(tmp_path, m3ter_config(sandbox, mappings=[USAGE_RULE_M3TER]), lines)
    assert result.returncode == 5
    assert len(result.error_lines) == 1
    assert "line 303: not valid JSON" in result.error_lines[0]
    assert sandbox.stats("m3ter")["stored"] == 300
    assert result.states == [{"bookmarks": {"usage": {"position": 300}}}]


def test_record_before_schema_names_the_line_and_stream(sandbox, tmp_path):
    lines = singer("usage", [{"id": 1, "account": "a", "at": 1795184122, "tokens": 1, "note": "n"}])
    lines.append(json.dumps({"type": "RECORD", "stream": "ghost", "record": {"id": 2}}))
    result = run_target(tmp_path, m3ter_config(sandbox, mappings=[USAGE_RULE_M3TER]), lines)
    assert result.returncode == 5
    assert "line 3 (stream 'ghost'):" in result.error_lines[0]
    assert sandbox.stats("m3ter")["stored"] == 1


def test_unknown_message_types_and_blank_lines_are_skipped(sandbox, tmp_path):
    lines = singer("usage", [{"id": 1, "account": "a", "at": 1795184122, "tokens": 1, "note": "n"}])
    lines[1:1] = ['{"type": "SURPRISE", "value": 1}', ""]
    result = run_target(tmp_path, m3ter_config(sandbox, mappings=[USAGE_RULE_M3TER]), lines)
    assert result.returncode == 0, result.stderr
    assert "line 2: skipping message of unknown type 'SURPRISE'" in result.stderr
    assert sandbox.stats("m3ter")["stored"] == 1


# --- secrets ---------------------------------------------------------------------------


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_debug_logging_shows_no_secret_and_no_token(sandbox, tmp_path, destination):
    records = bad_mix(500, bad_every=100)
    config = now_config(sandbox, destination, dead_letter_path="dead.jsonl")
    if destination in ("m3ter", "stripe"):
        sandbox.faults({"kind": "expire-tokens", "count": 1}, {"kind": "500", "count": 1})
    else:
        sandbox.faults({"kind": "500", "count": 1})
    result = run_target(tmp_path, config, singer("usage", records), args=["--log-level", "DEBUG"])
    assert result.returncode == 0, result.stderr
    assert "DEBUG" in result.stderr  # debug logging was really on
    tokens = requests.get(f"{sandbox.url}/_sandbox/tokens", timeout=10).json()["tokens"]
    secrets = [*(case.secret for case in CASES.values()), *tokens]
    if destination in ("m3ter", "stripe"):
        assert len(tokens) == 2  # the first token expired and was renewed
    outputs = result.stdout + result.stderr + (tmp_path / "dead.jsonl").read_text()
    for secret in secrets:
        assert secret not in outputs


@pytest.mark.parametrize("validate", [True, False])
def test_records_breaking_their_schema_are_dead_lettered_not_fatal(sandbox, tmp_path, validate):
    schema = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "account": {"type": "string"},
            "at": {"type": "string", "format": "date-time"},
            "tokens": {"type": "integer"},
            "note": {"type": "string"},
        },
    }
    records = [
        {"id": i, "account": "a", "at": "2026-11-20T10:00:00Z", "tokens": i, "note": "n"} for i in range(50)
    ]
    records[10]["at"] = "garbage"  # unparseable date-time: the SDK alone would stop the run
    records[20]["tokens"] = "7"  # breaks the schema (a string), still a valid number for m3ter
    records[30]["note"] = 5  # breaks the schema; the mapping converts it to "5"
    config = m3ter_config(
        sandbox,
        mappings=[USAGE_RULE_M3TER],
        dead_letter_path="dead.jsonl",
        max_rejected_ratio=1,
        validate_records=validate,
    )
    result = run_target(tmp_path, config, singer("usage", records, schema=schema))
    assert result.returncode == 0, result.stderr
    dead = {d["record"]["id"]: d for d in map(json.loads, (tmp_path / "dead.jsonl").read_text().splitlines())}
    expected = {10: "mapping", 20: "schema", 30: "schema"} if validate else {10: "mapping"}
    assert {i: d["stage"] for i, d in dead.items()} == expected
    assert dead[10]["field"] == "ts" and "garbage" in dead[10]["reason"]
    assert sandbox.stats("m3ter")["stored"] == 50 - len(expected)


def test_sigterm_while_the_tap_is_silent_stops_at_once(sandbox, tmp_path):
    # The tap sends a few records, then nothing for a long time: the target must not
    # wait for more input once asked to stop.
    config = crash_config(sandbox, shutdown_grace_seconds=5)
    run = Pipeline(tmp_path, config, 10_000, every=200, pause=60)
    wait_until(lambda: sandbox.stats("m3ter")["stored"] >= 200)
    started = time.monotonic()
    run.target.send_signal(signal.SIGTERM)
    code = run.target.wait(30)
    run.tap.kill()
    assert code == 0, run.stderr
    assert time.monotonic() - started < 10
    assert position(run.states[-1]) == 200
