"""The retry policy: which answers are sent again, how long to wait, the retry budget.

One rule decides whether an error answer is transient (``should_retry``, the vendors'
SDKs' ``_should_retry``); the transport (http.py), the destinations' reading of answers
(``Destination.judge``) and the read side all ask it. The numbers are in constants.py.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
import typing as t

from target_usage_billing.constants import (
    INITIAL_RETRY_DELAY_SECONDS,
    MAX_RETRY_DELAY_SECONDS,
    RETRY_SERVER_ERRORS_FROM,
    RETRY_STATUSES,
    SHOULD_RETRY_HEADER,
)
from target_usage_billing.errors import DeliveryError


class RetryableFailure(Exception):
    """A transient failure: the request is sent again after a wait."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RetryBudgetExhausted(DeliveryError):
    """Transient failures went on for longer than the retry budget."""


class RetryDecision(t.NamedTuple):
    """Whether to send an answer's request again, and whether the server said so itself."""

    retry: bool
    # x-should-retry decided (a platform's own reading of its refusals comes after a
    # server's "true", but before a server's "false": see Destination.judge)
    by_server: bool


def should_retry(status: int, headers: t.Mapping[str, str]) -> RetryDecision:
    """The one retry rule for an answer: pure, from its status and headers.

    A success (below 300) is never sent again by this rule. Otherwise ``x-should-retry:
    true|false`` from the server decides; without it 408, 409, 429 and every 5xx are
    transient and every other status is not.
    """
    if status < 300:
        return RetryDecision(False, False)
    hint = headers.get(SHOULD_RETRY_HEADER)
    if hint is not None:
        said = hint.strip().lower()
        if said in ("true", "false"):
            return RetryDecision(said == "true", True)
    return RetryDecision(status in RETRY_STATUSES or status >= RETRY_SERVER_ERRORS_FROM, False)


class _Answer(t.Protocol):
    status: int
    headers: t.Mapping[str, str]


def retryable_status(response: _Answer, what: str) -> RetryableFailure | None:
    """A RetryableFailure for a transient error answer (see ``should_retry``), else None."""
    if should_retry(response.status, response.headers).retry:
        return RetryableFailure(f"{what} answered {response.status}", retry_after_seconds(response.headers))
    return None


def retry_after_seconds(headers: t.Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a server asked for: ``retry-after-ms`` first, then ``Retry-After``."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            value = float(millis) / 1000
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    return parse_retry_after(headers.get("Retry-After"), now)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_waits(
    base: float = INITIAL_RETRY_DELAY_SECONDS, cap: float = MAX_RETRY_DELAY_SECONDS
) -> t.Generator[float, t.Any, None]:
    """Wait generator for ``backoff``: it is sent the exception of each failed try.

    Capped exponential with equal jitter; a server's wait (Retry-After, retry-after-ms),
    when given and above zero, wins. A wait of 0 gets the backoff delay, so a server
    answering "now" cannot cause a hot loop; backoff itself cuts any wait at what is left
    of the retry budget.
    """
    attempt = 0
    failure = yield 0.0  # backoff primes the generator with send(None) and drops this
    while True:
        ceiling = min(cap, base * (2**attempt))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        retry_after = getattr(failure, "retry_after", None)
        if retry_after is not None and retry_after > 0:
            delay = retry_after
        attempt += 1
        failure = yield delay
