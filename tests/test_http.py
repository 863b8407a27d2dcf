"""Unit tests of the retry policy pieces: Retry-After, waits, rate limiting, retries."""

from __future__ import annotations

import email.utils
import time

import pytest

from target_usage_billing.http import (
    HttpTransport,
    RateLimiter,
    RetryableFailure,
    RetryBudgetExhausted,
    backoff_waits,
    parse_retry_after,
)


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-4") == 0.0
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


def test_waits_grow_exponentially_are_capped_and_retry_after_wins():
    waits = backoff_waits(base=1.0, cap=8.0)
    waits.send(None)
    plain = [waits.send(RetryableFailure("x")) for _ in range(6)]
    for attempt, wait in enumerate(plain):
        ceiling = min(8.0, 2.0**attempt)
        assert ceiling / 2 <= wait <= ceiling
    assert waits.send(RetryableFailure("x", retry_after=17.0)) == 17.0


def test_rate_limiter_makes_the_request_over_the_window_wait():
    limiter = RateLimiter([(3, 0.3)])
    waited = [limiter.acquire() for _ in range(4)]
    assert waited[:3] == [0.0, 0.0, 0.0]
    assert waited[3] > 0


def test_rate_limiter_without_windows_never_waits():
    limiter = RateLimiter([])
    assert all(limiter.acquire() == 0.0 for _ in range(1000))


def test_retries_until_success_and_counts_them():
    transport = HttpTransport(retry_budget_seconds=10, backoff_base_seconds=0.01, backoff_cap_seconds=0.02)
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) < 3:
            raise RetryableFailure("flaky")
        return "ok"

    assert transport.with_retries(attempt, "test") == "ok"
    assert len(calls) == 3
    assert transport.stats.retries == 2


def test_retry_budget_exhausted_is_reported():
    transport = HttpTransport(retry_budget_seconds=0.2, backoff_base_seconds=0.05, backoff_cap_seconds=0.05)

    def attempt():
        raise RetryableFailure("down")

    with pytest.raises(RetryBudgetExhausted, match="retry budget: down"):
        transport.with_retries(attempt, "test")
