"""Requests in flight that adapt: the rule as a table, the slots, and real runs over
loopback against the sandbox with latency and with an injected 429 storm."""

from __future__ import annotations

import re
import threading
import time

import pytest

from target_usage_billing.concurrency import AdaptiveLimit, Answer, next_level
from tests.helpers import run_target, singer, usage
from tests.platforms import config_for

FAST = 0.1  # the base round trip in the table


@pytest.mark.parametrize(
    ("level", "answer", "slow_start", "expected"),
    [
        # busy and fast: slow start adds one per answer, then one per round trip (1/level)
        (8, Answer(0.1, saturated=True), True, (9, True)),
        (8, Answer(0.1, saturated=True), False, (8.125, False)),
        (64, Answer(0.1, saturated=True), True, (64, True)),  # never past the ceiling
        # slots to spare, or the client-side rate limit is what waits: no growth
        (8, Answer(0.1), True, (8, True)),
        (8, Answer(0.1, saturated=True, rate_limited=True), True, (8, True)),
        # round trips of a few milliseconds (loopback): the level it has keeps up
        # the platform says it is overloaded: half, and slow start ends
        (8, Answer(0.1, congested=True, saturated=True), True, (4, False)),
        (1, Answer(0.1, congested=True), False, (1, False)),  # never below one
        # answers twice as slow as the fastest: a queue is growing somewhere, a tenth less
        (10, Answer(0.25, saturated=True), True, (9, False)),
        (10, Answer(0.2, saturated=True), True, (11, True)),  # at twice exactly: still fast
    ],
)
def test_the_level_rule(level, answer, slow_start, expected):
    got = next_level(float(level), answer, FAST, 64, slow_start)
    assert got == (pytest.approx(expected[0]), expected[1])


def test_short_round_trips_do_not_grow_the_level():
    assert next_level(8.0, Answer(0.002, saturated=True), 0.002, 64, True) == (8.0, True)


def test_a_burst_of_refusals_lowers_the_level_once_per_round_trip():
    limit = AdaptiveLimit(64)
    for _ in range(20):
        limit.observe(Answer(0.1, saturated=True))
    assert limit.current == 28  # 8 + 20 in slow start
    for _ in range(10):  # ten 429s at once
        limit.observe(Answer(0.1, congested=True))
    assert limit.current == 14 and limit.decreases == 1
    time.sleep(0.15)  # a round trip later, a new refusal counts again
    limit.observe(Answer(0.1, congested=True))
    assert limit.current == 7 and limit.decreases == 2
    assert limit.peak == 28


def test_a_fixed_level_does_not_move():
    limit = AdaptiveLimit(5, adaptive=False)
    for _ in range(10):
        limit.observe(Answer(0.1, saturated=True))
    limit.observe(Answer(0.1, congested=True))
    assert limit.current == 5 and limit.describe() == "5"


def test_while_refused_one_probe_at_a_time_and_none_before_retry_after():
    limit = AdaptiveLimit(64)
    assert limit.clear_to_send(timeout=0)  # no episode: at once
    limit.observe(Answer(0.1, congested=True, retry_after=0.5))
    limit.sent()
    started = time.monotonic()
    assert not limit.clear_to_send(timeout=0.05)  # the platform asked for half a second
    assert limit.clear_to_send(timeout=10)  # the probe
    assert time.monotonic() - started >= 0.45
    assert not limit.clear_to_send(timeout=0.05)  # the others wait for the probe's answer
    limit.observe(Answer(0.1, saturated=True))  # it passed: the episode is over
    limit.sent()
    assert all(limit.clear_to_send(timeout=0) for _ in range(5))
    for _ in range(5):
        limit.sent()


def test_answers_of_requests_already_out_do_not_lengthen_the_pause():
    limit = AdaptiveLimit(64)
    for _ in range(30):  # a wave: every request in flight refused, no Retry-After
        limit.observe(Answer(0.1, congested=True))
    started = time.monotonic()
    assert limit.clear_to_send(timeout=10)  # one pause of the first backoff, not 2**30 of them
    assert time.monotonic() - started < 5
    limit.observe(Answer(0.1, congested=True))  # the probe refused: the pause doubles
    limit.sent()
    assert not limit.clear_to_send(timeout=0.6)
    assert limit.clear_to_send(timeout=10)
    limit.sent()


def test_a_fixed_level_has_no_pause():
    limit = AdaptiveLimit(8, adaptive=False)
    limit.observe(Answer(0.1, congested=True, retry_after=60))
    assert limit.clear_to_send(timeout=0)


def test_slots_hold_to_the_level_and_the_memory_budget():
    limit = AdaptiveLimit(64, initial=2, budget_bytes=1000)
    assert limit.acquire(0.01, size=5000)  # one batch always goes, whatever its size
    assert not limit.acquire(0.01, size=10)  # over the budget while it is in flight
    limit.release(5000)
    assert limit.acquire(0.01, size=600) and not limit.acquire(0.01, size=600)
    assert limit.acquire(0.01, size=300)  # fits beside it
    assert not limit.acquire(0.01, size=1)  # the level (2) is full
    released = threading.Timer(0.05, limit.release, args=(600,))
    released.start()
    assert limit.acquire(1.0, size=1)  # a slot came free while waiting
    released.join()


def in_flight_peak(stderr: str) -> int:
    found = re.search(r"requests in flight: up to (\d+) \(level now (.*?)\)", stderr)
    assert found, stderr
    return int(found.group(1))


def test_at_real_latency_the_level_grows_past_the_old_default(sandbox, tmp_path):
    sandbox.faults(latency_ms=100)
    rows = usage(4000)
    config = config_for("metronome", sandbox, batch_size_rows=100)
    result = run_target(tmp_path, config, singer("usage", rows, state={"done": 4000}))
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("metronome")["stored"] == 4000
    assert in_flight_peak(result.stderr) > 8  # 8 was the fixed default before
    assert "(level " in result.stderr


def test_adaptive_requests_in_flight_false_keeps_the_ceiling(sandbox, tmp_path):
    sandbox.faults(latency_ms=50)
    config = config_for(
        "metronome", sandbox, batch_size_rows=100, max_requests_in_flight=3, adaptive_requests_in_flight=False
    )
    result = run_target(tmp_path, config, singer("usage", usage(1000)))
    assert result.returncode == 0, result.stderr
    assert re.search(r"requests in flight: up to 3 \(level now 3\)", result.stderr), result.stderr


def test_a_429_storm_lowers_the_level_and_loses_nothing(sandbox, tmp_path):
    sandbox.faults({"kind": "429", "count": 12, "retry_after": "0", "destination": "lago"}, latency_ms=20)
    rows = usage(3000)
    config = config_for("lago", sandbox, batch_size_rows=100)
    result = run_target(tmp_path, config, singer("usage", rows, state={"done": 3000}))
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats("lago")
    assert stats["stored"] == 3000
    assert re.search(r"lowered \d+ times", result.stderr), result.stderr
    assert stats["requests"] == 30 + 12  # each refused request sent once more, nothing else
    assert result.states == [{"done": 3000}]


def test_a_storm_costs_the_requests_already_out_and_one_probe_a_retry_interval(sandbox, tmp_path):
    # everything refused for 1.5 s, Retry-After 0.3 s, after the first 5 requests
    sandbox.faults(
        {"kind": "429", "after": 5, "seconds": 1.5, "retry_after": "0.3", "destination": "lago"},
        latency_ms=20,
    )
    config = config_for("lago", sandbox, batch_size_rows=100, max_requests_in_flight=8)
    result = run_target(tmp_path, config, singer("usage", usage(6000), state={"done": 6000}))
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats("lago")
    assert stats["stored"] == 6000
    refused = stats["statuses"].get("429", 0)
    # at most the 8 in flight when it began, then one probe each 0.3 s of the 1.5 s (and
    # the one that finds it over); each batch retrying on its own would be about 8 x 6
    assert 1 <= refused <= 8 + 1.5 / 0.3 + 1, stats
    assert stats["requests"] == 60 + refused  # each refusal sent once more, nothing else
    assert result.states == [{"done": 6000}]
