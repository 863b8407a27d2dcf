"""The sandbox enforces the m3ter and Metronome contracts of billing-apis.md."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time

import pytest
import requests

from tests.helpers import start_sandbox, stop_sandbox
from tests.platforms import CASES, M3TER_KEY, M3TER_SECRET


def now_iso(**delta: float) -> str:
    moment = dt.datetime.now(dt.timezone.utc) + dt.timedelta(**delta)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def token(sandbox, key=M3TER_KEY, secret=M3TER_SECRET) -> requests.Response:
    basic = base64.b64encode(f"{key}:{secret}".encode()).decode()
    return requests.post(
        f"{sandbox.url}/oauth/token",
        headers={"Authorization": f"Basic {basic}"},
        json={"grant_type": "client_credentials"},
        timeout=10,
    )


def measurement(i: int = 0, **extra) -> dict:
    return {"uid": f"u{i}", "meter": "api", "account": "acme", "ts": now_iso(hours=-1), **extra}


def post_measurements(sandbox, items, bearer=None) -> requests.Response:
    bearer = bearer or token(sandbox).json()["access_token"]
    return requests.post(
        f"{sandbox.url}/organizations/org/measurements",
        data=json.dumps({"measurements": items}),
        headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"},
        timeout=10,
    )


METRONOME = CASES["metronome"]


def event(i: int = 0, **extra) -> dict:
    return {
        "transaction_id": f"t{i}",
        "customer_id": "acme",
        "event_type": "api",
        "timestamp": now_iso(hours=-1),
        "properties": {"n": "1"},
        **extra,
    }


# --- m3ter ---------------------------------------------------------------------------


def test_m3ter_token_needs_the_right_basic_credentials(sandbox):
    good = token(sandbox)
    assert good.status_code == 200
    assert good.json()["token_type"] == "Bearer"
    assert good.json()["expires_in"] == 18000
    assert token(sandbox, secret="wrong").status_code == 401


def test_m3ter_accepts_valid_measurements_and_deduplicates_by_uid(sandbox):
    answer = post_measurements(sandbox, [measurement(1), measurement(2, measure={"n": 1.5})])
    assert answer.status_code == 200
    assert answer.json() == {"result": "accepted"}
    again = post_measurements(sandbox, [measurement(1)])
    assert again.status_code == 200
    stats = sandbox.stats("m3ter")
    assert stats["accepted"] == 2
    assert stats["duplicates"] == 1
    assert len(sandbox.items("m3ter")) == 2


def test_m3ter_counts_a_resent_uid_with_a_different_body_as_conflict(sandbox):
    post_measurements(sandbox, [measurement(1, measure={"n": 1})])
    post_measurements(sandbox, [measurement(1, measure={"n": 2})])
    assert sandbox.stats("m3ter")["conflicts"] == 1


@pytest.mark.parametrize(
    ("item", "where"),
    [
        (
            {"meter": "api", "account": "acme", "ts": "2026-11-20T14:15:22Z", "measure": {"n": "x"}},
            "measure.n",
        ),
        ({"meter": "api", "ts": "2026-11-20T14:15:22Z"}, "account"),
        ({"meter": "api", "account": "a", "ts": "2026-11-20T14:15:22"}, "ts"),  # no offset
        ({"meter": "api", "account": "a", "ts": "2026-11-20T14:15:22Z", "who": {"u": 1}}, "who.u"),
        ({"meter": "api", "account": "a", "ts": "2026-11-20T14:15:22Z", "measure": {"1x": 1}}, "measure"),
        ({"meter": "api", "account": "a", "ts": "2026-11-20T14:15:22Z", "unknown": 1}, "unknown"),
    ],
)
def test_m3ter_one_bad_item_fails_the_request_naming_index_and_field(sandbox, item, where):
    answer = post_measurements(sandbox, [measurement(0), item])
    assert answer.status_code == 400
    message = answer.json()["message"]
    assert "measurements[1]" in message
    assert where.split(".")[0] in message
    assert sandbox.stats("m3ter")["accepted"] == 0


def test_m3ter_refuses_future_times(sandbox):
    answer = post_measurements(sandbox, [measurement(0, ts=now_iso(hours=2))])
    assert answer.status_code == 400
    assert "future" in answer.json()["message"]


def test_m3ter_limits_items_and_body_size(sandbox):
    assert post_measurements(sandbox, []).status_code == 400
    assert post_measurements(sandbox, [measurement(i) for i in range(1001)]).status_code == 400
    assert post_measurements(sandbox, [measurement(i) for i in range(1000)]).status_code == 200
    big = [measurement(i, metadata={"blob": "x" * 600}) for i in range(1000)]
    assert len(json.dumps({"measurements": big})) >= 512_000
    assert post_measurements(sandbox, big).status_code == 403


def test_m3ter_expired_or_unknown_token_is_answered_403(sandbox):
    assert post_measurements(sandbox, [measurement()], bearer="made-up").status_code == 403
    bearer = token(sandbox).json()["access_token"]
    sandbox.expire_tokens()
    assert post_measurements(sandbox, [measurement()], bearer=bearer).status_code == 403


def test_m3ter_short_token_lifetime(tmp_path):
    short = start_sandbox(tmp_path, "--token-lifetime", "0.2")
    try:
        answer = token(short)
        assert answer.json()["expires_in"] == 0.2
        bearer = answer.json()["access_token"]
        import time

        time.sleep(0.3)
        assert post_measurements(short, [measurement()], bearer=bearer).status_code == 403
    finally:
        stop_sandbox(short)


def test_m3ter_rate_limit_answers_429_with_retry_after(sandbox):
    bearer = token(sandbox).json()["access_token"]
    statuses = [post_measurements(sandbox, [measurement(i)], bearer=bearer) for i in range(55)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited, "over 50 requests within a second must be limited"
    assert limited[0].headers["Retry-After"] == "1"


# --- Metronome -----------------------------------------------------------------------


def test_metronome_accepts_a_bare_array_gzip_or_not_and_deduplicates(sandbox):
    assert METRONOME.post_items(sandbox, [event(1), event(2)]).status_code == 200
    assert METRONOME.post_items(sandbox, [event(2), event(3)], compress=True).status_code == 200
    stats = sandbox.stats("metronome")
    assert stats["accepted"] == 3
    assert stats["duplicates"] == 1
    assert stats["gzip_requests"] == 1


def test_metronome_bad_token_is_403(sandbox):
    assert METRONOME.post_items(sandbox, [event()], key="wrong").status_code == 403
    probe = requests.get(
        f"{sandbox.url}/v1/customers?limit=1", headers={"Authorization": "Bearer wrong"}, timeout=10
    )
    assert probe.status_code == 403


@pytest.mark.parametrize(
    "events",
    [
        [],
        [event(i) for i in range(101)],
        [event(0), event(1, timestamp=now_iso(days=-35))],
        [event(0), event(1, timestamp=now_iso(hours=25))],
        [event(0), {"transaction_id": "x", "customer_id": "c", "timestamp": now_iso()}],
        {"events": [event(0)]},
    ],
    ids=["empty", "over-100", "too-old", "too-far-ahead", "missing-event-type", "not-an-array"],
)
def test_metronome_one_invalid_event_fails_the_whole_request(sandbox, events):
    answer = METRONOME.post_items(sandbox, events)
    assert answer.status_code == 400
    assert sandbox.stats("metronome")["accepted"] == 0


# --- faults and persistence -----------------------------------------------------------


def test_injected_faults_then_recovery(sandbox):
    sandbox.faults({"kind": "429", "count": 1, "retry_after": "2"}, {"kind": "503", "count": 1})
    first = METRONOME.post_items(sandbox, [event(1)])
    assert (first.status_code, first.headers.get("Retry-After")) == (429, "2")
    assert METRONOME.post_items(sandbox, [event(1)]).status_code == 503
    assert METRONOME.post_items(sandbox, [event(1)]).status_code == 200


def test_a_storm_refuses_everything_for_its_seconds_after_letting_some_through(sandbox):
    sandbox.faults({"kind": "429", "after": 2, "seconds": 2, "retry_after": "1", "destination": "metronome"})
    assert [METRONOME.post_items(sandbox, [event(i)]).status_code for i in range(2)] == [200, 200]
    started = time.monotonic()
    during = []
    while time.monotonic() - started < 0.5:  # well inside the storm's two seconds
        during.append(METRONOME.post_items(sandbox, [event(9)]))
    assert during and {(r.status_code, r.headers.get("Retry-After")) for r in during} == {(429, "1")}
    time.sleep(max(0.0, 2.1 - (time.monotonic() - started)))
    assert METRONOME.post_items(sandbox, [event(9)]).status_code == 200
    assert sandbox.stats("metronome")["statuses"]["429"] == len(during)


def test_stored_then_500_keeps_the_items(sandbox):
    sandbox.faults({"kind": "stored-500", "count": 1, "destination": "metronome"})
    assert METRONOME.post_items(sandbox, [event(1)]).status_code == 500
    assert METRONOME.post_items(sandbox, [event(1)]).status_code == 200
    stats = sandbox.stats("metronome")
    assert (stats["accepted"], stats["duplicates"]) == (1, 1)


def test_dropped_connection(sandbox):
    sandbox.faults({"kind": "drop", "count": 1})
    with pytest.raises(requests.ConnectionError):
        METRONOME.post_items(sandbox, [event(1)])
    assert METRONOME.post_items(sandbox, [event(1)]).status_code == 200


def test_accepted_items_survive_a_sandbox_restart(tmp_path):
    first = start_sandbox(tmp_path)
    try:
        METRONOME.post_items(first, [event(1)])
    finally:
        stop_sandbox(first)
    second = start_sandbox(tmp_path)
    try:
        assert len(second.items("metronome")) == 1
        METRONOME.post_items(second, [event(1)])
        assert second.stats("metronome")["duplicates"] == 1
    finally:
        stop_sandbox(second)


def test_a_reset_voids_requests_still_in_flight(sandbox):
    import threading

    sandbox.faults({"kind": "slow", "count": 1, "delay_ms": 800})
    answers = []
    slow = threading.Thread(target=lambda: answers.append(METRONOME.post_items(sandbox, [event(1)])))
    slow.start()
    import time

    time.sleep(0.3)
    sandbox.reset()
    slow.join()
    assert answers[0].status_code == 503
    assert sandbox.stats("metronome")["stored"] == 0
