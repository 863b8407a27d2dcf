"""Lago: the destination against the sandbox, and Lago's official SDK
(lago-python-client) as the referee of both (the families shared with the other
platforms run it too: see CASES
in tests/platforms.py)."""

from __future__ import annotations

import datetime as dt
import json
import typing as t

import pytest
from lago_python_client.client import Client
from lago_python_client.exceptions import LagoApiError
from lago_python_client.models.event import BatchEvent, Event

from tests.helpers import RECENT, dead_letters, run_target, singer, usage
from tests.platforms import CASES, LAGO_KEY, config_for, load_segment_tracks
from tests.referees import body_items, problems, referee_bodies


def event(key: str, **fields: t.Any) -> dict:
    return {
        "transaction_id": key,
        "external_subscription_id": "sub-1",
        "code": "tokens",
        "timestamp": RECENT,
        "properties": {"tokens": 5},
        **fields,
    }


LAGO = CASES["lago"]


# --- the target ----------------------------------------------------------------------


def test_segment_events_arrive_once_with_lagos_fields_and_unix_seconds(sandbox, tmp_path):
    result, pairs = load_segment_tracks(sandbox, tmp_path, "lago", CASES["lago"].config(sandbox), seed=4)
    for record, item in pairs:
        assert item["code"] == record["event"]
        assert item["external_subscription_id"] == record["context"]["groupId"]
        assert item["properties"] == record["properties"]
        moment = dt.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))  # milliseconds
        assert str(item["timestamp"]) == f"{moment.timestamp():.3f}".rstrip("0").rstrip(".")
    assert result.states[-1] is not None


def test_timestamps_are_whole_seconds_or_exact_decimal_text(sandbox, tmp_path):
    rows = usage(2)
    rows[0]["at"] = "2026-11-21T10:00:00Z"
    rows[1]["at"] = "2026-11-21T10:00:00.25+00:00"
    config = config_for("lago", sandbox, dry_run=True)
    result = run_target(tmp_path, config, singer("usage", rows))
    assert result.returncode == 0, result.stderr
    (request,) = [json.loads(line) for line in (tmp_path / "dry-run-requests.jsonl").read_text().splitlines()]
    assert [e["timestamp"] for e in request["body"]["events"]] == [1795255200, "1795255200.25"]


def test_events_lago_already_has_are_counted_as_already_stored_not_rejected(sandbox, tmp_path):
    rows = usage(5)
    first = run_target(tmp_path, config_for("lago", sandbox), singer("usage", rows[:3]))
    assert first.returncode == 0, first.stderr
    # a re-run overlapping the first (a crash before its STATE): Lago refuses the repeats
    second = run_target(tmp_path, config_for("lago", sandbox), singer("usage", rows, state={"done": 5}))
    assert second.returncode == 0, second.stderr
    assert sandbox.stats("lago")["stored"] == 5
    assert "already stored 3" in second.stderr
    assert "rejected 0" in second.stderr and not dead_letters(tmp_path)
    assert second.states == [{"done": 5}]


def test_after_a_lost_acknowledgement_lago_s_stored_indexes_are_dropped_not_bisected(sandbox, tmp_path):
    # The first request of 100 is stored, then the connection drops before the answer:
    # the re-send is refused with value_already_exist for every index. One request in
    # flight, so the fault meets the batch of 100 rather than whichever is sent first.
    sandbox.faults({"kind": "stored-drop", "count": 1, "destination": "lago"})
    rows = usage(110)
    config = config_for("lago", sandbox, max_requests_in_flight=1)
    result = run_target(tmp_path, config, singer("usage", rows, state={"done": 110}))
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats("lago")
    assert stats["stored"] == 110
    # stored + dropped, the refused re-send, the other 10: no halving down to single events
    assert stats["requests"] == 3, stats
    assert "already stored 100" in result.stderr and "rejected 0" in result.stderr
    assert result.states == [{"done": 110}]


def test_a_resumed_run_sends_lago_only_the_events_it_lacks(sandbox, tmp_path):
    rows = usage(100)
    first = run_target(tmp_path, config_for("lago", sandbox), singer("usage", rows[::2]))  # 50 stored
    assert first.returncode == 0, first.stderr
    before = sandbox.stats("lago")["requests"]
    sandbox.faults(refuse_items_containing=["REFUSE"])
    rows[7]["note"] = "REFUSE"  # one new event Lago refuses for its content
    second = run_target(
        tmp_path,
        config_for("lago", sandbox, max_rejected_ratio=1),
        singer("usage", rows, state={"done": 100}),
    )
    assert second.returncode == 0, second.stderr
    assert sandbox.stats("lago")["stored"] == 99
    assert "already stored 50" in second.stderr and "rejected 1" in second.stderr
    (dead,) = dead_letters(tmp_path)
    assert dead["record"]["id"] == 7
    # halving isolates the refused event, and at every step the stored events Lago names
    # leave the request: 20 requests here, where halving down to single events (each
    # stored one refused alone) cost about 200
    assert sandbox.stats("lago")["requests"] - before <= 25


def test_an_event_lago_refuses_is_isolated_and_dead_lettered(sandbox, tmp_path):
    sandbox.faults(refuse_items_containing=["REFUSE"])
    rows = usage(6)
    rows[4]["note"] = "REFUSE"
    result = run_target(tmp_path, config_for("lago", sandbox, max_rejected_ratio=1), singer("usage", rows))
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("lago")["stored"] == 5
    (dead,) = dead_letters(tmp_path)
    assert dead["stage"] == "api" and dead["record"]["id"] == 4 and "Lago answered 422" in dead["reason"]


# --- the sandbox's contract ------------------------------------------------------------


def test_the_sandbox_refuses_a_whole_request_naming_each_refused_event_by_index(sandbox):
    answer = LAGO.post_items(
        sandbox,
        [event("ok"), event("bad-time", timestamp="yesterday"), event("no-sub", external_subscription_id="")],
    )
    assert answer.status_code == 422
    details = answer.json()["error_details"]
    assert details == {
        "1": {"timestamp": ["invalid_format"]},
        "2": {"external_subscription_id": ["value_is_mandatory"]},
    }
    assert sandbox.stats("lago")["stored"] == 0


def test_the_sandbox_refuses_ids_it_already_has_and_oversized_requests(sandbox):
    assert LAGO.post_items(sandbox, [event("a"), event("b")]).status_code == 200
    again = LAGO.post_items(sandbox, [event("c"), event("a")])
    assert again.status_code == 422
    assert again.json()["error_details"] == {"1": {"transaction_id": ["value_already_exist"]}}
    assert sandbox.stats("lago")["stored"] == 2  # "c" was not taken either
    assert LAGO.post_items(sandbox, [event(f"e{i}") for i in range(101)]).status_code == 422
    assert LAGO.post_items(sandbox, [event("z")], key="wrong").status_code == 401


# --- the official SDK as referee ---------------------------------------------------------


def test_every_body_fits_the_sdk_request_type(tmp_path):
    for bodies in referee_bodies(tmp_path, "lago", seed=10, hours=48):
        for body in bodies:
            BatchEvent.parse_obj(body)  # the SDK's own model takes it
        events = body_items(LAGO, bodies)
        assert events
        assert [p for i, item in enumerate(events) for p in problems(item, Event, f"events[{i}]")] == []


def lago_client(sandbox, key: str = LAGO_KEY) -> Client:
    return Client(api_key=key, api_url=f"{sandbox.url}/lago/", max_retries=0)


def test_the_lago_sdk_ingests_through_the_sandbox(sandbox):
    client = lago_client(sandbox)
    client.events.batch_create(
        BatchEvent(events=[Event(**event("s1")), Event(**event("s2", timestamp="1795184122.5"))])
    )
    assert sandbox.stats("lago")["stored"] == 2


def test_the_lago_sdk_gets_the_errors_it_expects(sandbox):
    with pytest.raises(LagoApiError) as caught:
        lago_client(sandbox, key="wrong").events.batch_create(BatchEvent(events=[Event(**event("x"))]))
    assert caught.value.status_code == 401
    with pytest.raises(LagoApiError) as caught:
        lago_client(sandbox).events.batch_create(
            BatchEvent(events=[Event(**event(f"e{i}")) for i in range(101)])
        )
    assert caught.value.status_code == 422
    sandbox.faults({"kind": "503", "count": 1, "destination": "lago"})
    with pytest.raises(LagoApiError) as caught:
        lago_client(sandbox).events.batch_create(BatchEvent(events=[Event(**event("r"))]))
    assert caught.value.status_code == 503
