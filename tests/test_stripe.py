"""Stripe meter events: the destination against the sandbox, and Stripe's official SDK
(stripe) as the referee of both (the families shared with the other platforms run it
too: see CASES in
tests/platforms.py)."""

from __future__ import annotations

import json
import re
import typing as t
from decimal import Decimal

import pytest
import requests
import stripe
from stripe.params.v2.billing._meter_event_stream_create_params import MeterEventStreamCreateParamsEvent

from target_usage_billing.sandbox.samples import singer_lines
from tests.helpers import dead_letters, run_target, singer, stamp, usage
from tests.platforms import CASES, STRIPE_KEY, config_for
from tests.referees import body_items, problems, referee_bodies


def meter_event(key: str, **fields: t.Any) -> dict:
    return {
        "event_name": "tokens",
        "identifier": key,
        "timestamp": stamp(3600),
        "payload": {"stripe_customer_id": "cus_1", "value": "5"},
        **fields,
    }


def session_token(sandbox, key: str = STRIPE_KEY) -> requests.Response:
    return requests.post(
        f"{sandbox.url}/stripe/v2/billing/meter_event_session",
        headers={"Authorization": f"Bearer {key}"},
        json={},
        timeout=10,
    )


STRIPE = CASES["stripe"]


# --- the target ----------------------------------------------------------------------


def test_segment_events_arrive_once_as_meter_events_with_exact_text_values(sandbox, tmp_path):
    lines = list(singer_lines(300, seed=7, hours=6, state_every=100))
    config = CASES["stripe"].config(
        sandbox,
        mappings=[
            {
                "stream": "segment_events",
                "preset": "segment",
                "filter": "type == 'track' && properties.cost_usd != null",
                "fields": {
                    "payload": {"stripe_customer_id": "context.groupId", "value": "properties.cost_usd"}
                },
            }
        ],
    )
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line)["record"] for line in lines if '"RECORD"' in line]
    priced = {
        r["messageId"]: r
        for r in records
        if r["type"] == "track" and r["properties"].get("cost_usd") is not None
    }
    stored = {item["identifier"]: item for item in sandbox.items("stripe")}
    assert set(stored) == set(priced) and stored
    for key, item in stored.items():
        record = priced[key]
        assert item["event_name"] == record["event"]
        assert item["payload"]["stripe_customer_id"] == record["context"]["groupId"]
        # the value as the tap wrote it, digit for digit, as text
        line = next(line for line in lines if key in line and '"RECORD"' in line)
        literal = re.search(r'"cost_usd": ([-0-9.eE+]+)', line).group(1)  # type: ignore[union-attr]
        value = item["payload"]["value"]
        assert isinstance(value, str) and Decimal(value) == Decimal(literal)  # exact, never a float
        assert "e" not in value.lower()  # plain decimal notation (7.35e-05 -> "0.0000735")


def test_an_expired_session_is_renewed_once_and_nothing_is_lost(sandbox, tmp_path):
    sandbox.faults({"kind": "expire-tokens", "count": 1, "destination": "stripe"})
    result = run_target(tmp_path, config_for("stripe", sandbox), singer("usage", usage(250)))
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("stripe")["stored"] == 250
    tokens = requests.get(f"{sandbox.url}/_sandbox/tokens", timeout=10).json()["tokens"]
    assert len(tokens) == 2  # the first session expired, a second one was made
    for token in tokens:
        assert token not in result.stderr


def test_two_session_expiries_close_together_renew_twice_not_blame_the_key(sandbox, tmp_path):
    # the request after the first renewal meets an expired session again
    sandbox.faults({"kind": "expire-tokens", "count": 2, "destination": "stripe"})
    result = run_target(
        tmp_path, config_for("stripe", sandbox, max_requests_in_flight=1), singer("usage", usage(250))
    )
    assert result.returncode == 0, result.stderr
    assert "check stripe_api_key" not in result.stderr
    assert sandbox.stats("stripe")["stored"] == 250
    tokens = requests.get(f"{sandbox.url}/_sandbox/tokens", timeout=10).json()["tokens"]
    assert len(tokens) == 3  # a fresh session after each expiry


def test_a_wrong_key_is_still_blamed_when_a_session_cannot_be_made(sandbox, tmp_path):
    result = run_target(
        tmp_path, config_for("stripe", sandbox, stripe_api_key="sk_test_wrong"), singer("usage", usage(3))
    )
    assert result.returncode == 3, result.stderr
    assert "stripe_api_key" in result.error_lines[0]


def test_a_payload_without_the_meters_keys_is_dead_lettered(sandbox, tmp_path):
    rows = usage(3)
    rows[1]["account"] = None  # no customer for this one
    result = run_target(tmp_path, config_for("stripe", sandbox, max_rejected_ratio=1), singer("usage", rows))
    assert result.returncode == 0, result.stderr
    (dead,) = dead_letters(tmp_path)
    assert dead["stage"] == "validation" and "payload needs stripe_customer_id" in dead["reason"]
    assert sandbox.stats("stripe")["stored"] == 2


# --- the sandbox's contract ------------------------------------------------------------


def test_the_sandbox_wants_a_live_session_and_dedupes_by_identifier(sandbox):
    assert session_token(sandbox, key="sk_wrong").status_code == 401
    token = session_token(sandbox).json()["authentication_token"]
    assert STRIPE.post_items(sandbox, [meter_event("a")], key="not-a-session").status_code == 401
    assert STRIPE.post_items(sandbox, [meter_event("a"), meter_event("b")], key=token).status_code == 200
    assert STRIPE.post_items(sandbox, [meter_event("a")], key=token).status_code == 200
    assert sandbox.stats("stripe")["stored"] == 2 and sandbox.stats("stripe")["duplicates"] == 1
    sandbox.expire_tokens()
    expired = STRIPE.post_items(sandbox, [meter_event("c")], key=token)
    assert expired.status_code == 401 and expired.json()["error"]["type"] == "temporary_session_expired"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"payload": {"stripe_customer_id": "cus_1", "value": 5}}, "payload: must be an object of strings"),
        ({"payload": {"value": "5"}}, "payload.stripe_customer_id: required"),
        ({"timestamp": 36 * 86400}, "within the past 35 days"),  # seconds ago, stamped when run
        ({"timestamp": -600}, "at most 5 minutes in the future"),
        ({"colour": "red"}, "colour: unknown parameter"),
    ],
)
def test_the_sandbox_refuses_a_malformed_event_and_the_whole_request(sandbox, change, message):
    if isinstance(change.get("timestamp"), int):
        change = {"timestamp": stamp(change["timestamp"])}
    token = session_token(sandbox).json()["authentication_token"]
    answer = STRIPE.post_items(sandbox, [meter_event("ok"), {**meter_event("bad"), **change}], key=token)
    assert answer.status_code == 400
    assert (
        answer.json()["error"]["message"].startswith("events[1].")
        and message in answer.json()["error"]["message"]
    )
    assert sandbox.stats("stripe")["stored"] == 0


# --- the official SDK as referee ---------------------------------------------------------


def test_every_body_fits_the_sdk_request_type(tmp_path):
    for bodies in referee_bodies(tmp_path, "stripe", seed=12, hours=48):
        assert all(set(body) == {"events"} and len(body["events"]) <= 100 for body in bodies)
        events = body_items(STRIPE, bodies)
        assert events
        found = [
            p
            for i, item in enumerate(events)
            for p in problems(item, MeterEventStreamCreateParamsEvent, f"events[{i}]")
        ]
        assert found == []


def stripe_client(sandbox, key: str) -> stripe.StripeClient:
    base = f"{sandbox.url}/stripe"
    return stripe.StripeClient(key, base_addresses={"api": base, "meter_events": base}, max_network_retries=0)


def test_the_stripe_sdk_opens_a_session_and_streams_through_the_sandbox(sandbox):
    session = stripe_client(sandbox, STRIPE_KEY).v2.billing.meter_event_session.create()
    assert session.authentication_token and session.expires_at
    stream_client = stripe_client(sandbox, session.authentication_token)
    stream_client.v2.billing.meter_event_stream.create({"events": [meter_event("s1"), meter_event("s2")]})
    assert sandbox.stats("stripe")["stored"] == 2


def test_the_stripe_sdk_gets_the_error_classes_it_expects(sandbox):
    with pytest.raises(stripe.AuthenticationError):
        stripe_client(sandbox, "sk_wrong").v2.billing.meter_event_session.create()
    session = stripe_client(sandbox, STRIPE_KEY).v2.billing.meter_event_session.create()
    stream_client = stripe_client(sandbox, session.authentication_token)
    with pytest.raises(stripe.InvalidRequestError):  # over 100 events in one request
        stream_client.v2.billing.meter_event_stream.create(
            {"events": [meter_event(f"e{i}") for i in range(101)]}
        )
    sandbox.expire_tokens()
    with pytest.raises(stripe.TemporarySessionExpiredError):
        stream_client.v2.billing.meter_event_stream.create({"events": [meter_event("late")]})
