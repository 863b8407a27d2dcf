"""Orb: the destination against the sandbox, and Orb's official SDK (orb-billing) as the
referee of both (the families shared with the other platforms run it too: see
CASES in tests/platforms.py)."""

from __future__ import annotations

import datetime as dt
import typing as t

import orb
import pytest
from orb.types.event_ingest_params import Event as OrbEvent

from tests.helpers import RECENT, dead_letters, run_target, singer, stamp, usage
from tests.platforms import CASES, ORB_KEY, config_for, load_segment_tracks
from tests.referees import body_items, problems, referee_bodies


def event(key: str, **fields: t.Any) -> dict:
    return {
        "idempotency_key": key,
        "event_name": "tokens",
        "timestamp": stamp(3600),
        "external_customer_id": "acct-1",
        "properties": {"tokens": 5},
        **fields,
    }


ORB = CASES["orb"]


# --- the target ----------------------------------------------------------------------


def test_segment_events_arrive_once_with_orbs_fields(sandbox, tmp_path):
    result, pairs = load_segment_tracks(sandbox, tmp_path, "orb", CASES["orb"].config(sandbox), seed=3)
    for record, item in pairs:
        assert item["event_name"] == record["event"]
        assert item["external_customer_id"] == record["context"]["groupId"]
        assert item["properties"] == record["properties"]  # numbers exact, as JSON numbers
        assert item["timestamp"].endswith("Z") and "customer_id" not in item
    assert result.states[-1] is not None


def test_usage_older_than_the_grace_period_is_dead_lettered_with_the_backfill_hint(sandbox, tmp_path):
    rows = usage(3)
    rows[1]["at"] = RECENT - 13 * 3600  # 14 hours ago: past Orb's 12-hour grace period
    result = run_target(tmp_path, config_for("orb", sandbox, max_rejected_ratio=1), singer("usage", rows))
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("orb")["stored"] == 2
    (dead,) = dead_letters(tmp_path)
    assert dead["stage"] == "validation" and dead["record"]["id"] == 1
    assert "grace period" in dead["reason"] and "backfill" in dead["reason"]


def test_a_longer_grace_period_is_a_setting(sandbox, tmp_path):
    rows = usage(2, at=RECENT - 20 * 3600)
    config = config_for("orb", sandbox, orb_grace_period_hours=48, max_rejected_ratio=1)
    result = run_target(tmp_path, config, singer("usage", rows))
    assert result.returncode == 0, result.stderr
    # the sandbox keeps Orb's default (12 h): the API refuses them, they are dead-lettered
    assert sandbox.stats("orb")["stored"] == 0
    assert all(d["stage"] == "api" for d in dead_letters(tmp_path))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"customer_id": "'orb-1'"}, "exactly one of customer_id and external_customer_id"),
        ({"properties": "nested"}, "properties.deep: Orb takes numbers, booleans and strings only"),
    ],
)
def test_events_orb_would_refuse_are_dead_lettered_one_by_one(sandbox, tmp_path, fields, reason):
    config = CASES["orb"].config(
        sandbox,
        max_rejected_ratio=1,
        mappings=[
            {
                "stream": "usage",
                "fields": {
                    "external_customer_id": "account",
                    "event_name": "'tokens'",
                    "timestamp": "at",
                    "properties": {"tokens": "tokens"},
                    **fields,
                },
            }
        ],
    )
    rows = usage(3)
    for row in rows:
        row["nested"] = {"deep": {"x": 1}} if row["id"] == 1 else {"flat": 1}
    result = run_target(tmp_path, config, singer("usage", rows))
    assert result.returncode == 0, result.stderr
    dead = dead_letters(tmp_path)
    assert dead and all(reason in d["reason"] and d["stage"] == "validation" for d in dead)


def test_missing_properties_are_sent_as_an_empty_object(sandbox, tmp_path):
    config = CASES["orb"].config(
        sandbox,
        mappings=[
            {
                "stream": "usage",
                "fields": {"external_customer_id": "account", "event_name": "'n'", "timestamp": "at"},
            }
        ],
    )
    result = run_target(tmp_path, config, singer("usage", usage(2)))
    assert result.returncode == 0, result.stderr
    assert [item["properties"] for item in sandbox.items("orb")] == [{}, {}]


# --- the sandbox's contract ------------------------------------------------------------


def test_the_sandbox_dedupes_by_idempotency_key_and_says_so_in_debug_mode(sandbox):
    assert ORB.post_items(sandbox, [event("a"), event("b")]).json() == {"validation_failed": []}
    answer = ORB.post_items(sandbox, [event("a"), event("c")], query="?debug=true").json()
    assert answer["debug"] == {"duplicate": ["a"], "ingested": ["c"]}
    assert sandbox.stats("orb")["stored"] == 3


def test_the_sandbox_refuses_a_whole_request_naming_each_failed_key(sandbox):
    answer = ORB.post_items(
        sandbox,
        [
            event("ok"),
            event("old", timestamp=stamp(13 * 3600)),
            event("both", customer_id="orb-1"),
            event("ahead", timestamp=stamp(-600)),
            event("nested", properties={"x": {"y": 1}}),
            event("offset", timestamp="2026-11-20T10:00:00+02:00"),
        ],
    )
    assert answer.status_code == 400
    failed = {
        entry["idempotency_key"]: entry["validation_errors"] for entry in answer.json()["validation_failed"]
    }
    assert set(failed) == {"old", "both", "ahead", "nested", "offset"}
    assert "grace period" in failed["old"][0] and "5 minutes" in failed["ahead"][0]
    assert sandbox.stats("orb")["stored"] == 0  # nothing of a refused request is ingested


def test_the_sandbox_refuses_conflicting_bodies_for_one_key_and_oversized_requests(sandbox):
    assert ORB.post_items(sandbox, [event("k"), event("k", event_name="other")]).status_code == 400
    assert ORB.post_items(sandbox, [event(f"e{i}") for i in range(501)]).status_code == 400
    assert ORB.post_items(sandbox, [event("k")], key="wrong").status_code == 401
    assert (
        ORB.post_items(sandbox, [event("k")], query="?backfill_id=b1").status_code == 404
    )  # no such backfill


# --- the official SDK as referee ---------------------------------------------------------


def test_every_body_fits_the_sdk_request_type(tmp_path):
    for bodies in referee_bodies(tmp_path, "orb", seed=9, hours=6):
        assert all(set(body) == {"events"} for body in bodies)
        events = body_items(ORB, bodies)
        assert events
        assert [p for i, item in enumerate(events) for p in problems(item, OrbEvent, f"events[{i}]")] == []


def orb_client(sandbox, **options: t.Any) -> orb.Orb:
    options.setdefault("api_key", ORB_KEY)
    return orb.Orb(base_url=f"{sandbox.url}/orb/v1", **options)


def sdk_event(key: str) -> dict:
    moment = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    return {
        "idempotency_key": key,
        "event_name": "tokens",
        "timestamp": moment,  # the SDK writes ISO 8601 (+00:00)
        "external_customer_id": "acct-1",
        "properties": {"tokens": 3},
    }


def test_the_orb_sdk_authenticates_lists_customers_and_ingests_through_the_sandbox(sandbox):
    client = orb_client(sandbox)
    assert list(client.customers.list()) == []
    answer = client.events.ingest(events=[sdk_event("s1"), sdk_event("s2")])
    assert answer.validation_failed == []
    assert sandbox.stats("orb")["stored"] == 2


def test_the_orb_sdk_gets_the_error_classes_it_expects(sandbox):
    with pytest.raises(orb.OrbAuthenticationError):
        orb_client(sandbox, api_key="wrong", max_retries=0).events.ingest(events=[sdk_event("x")])
    client = orb_client(sandbox, max_retries=0)
    with pytest.raises(orb.RequestValidationError):  # over 500 events in one request
        client.events.ingest(events=[sdk_event(f"e{i}") for i in range(501)])
    sandbox.faults({"kind": "429", "count": 1, "retry_after": "1", "destination": "orb"})
    with pytest.raises(orb.RateLimitError):
        client.events.ingest(events=[sdk_event("r")])
    sandbox.faults({"kind": "503", "count": 1, "destination": "orb"})
    with pytest.raises(orb.OrbInternalServerError):
        client.events.ingest(events=[sdk_event("r")])
    sandbox.faults({"kind": "503", "count": 1, "destination": "orb"})
    assert orb_client(sandbox, max_retries=2).events.ingest(events=[sdk_event("r")]).validation_failed == []
