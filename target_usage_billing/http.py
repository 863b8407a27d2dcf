"""HTTP transport: pooled keep-alive connections, the retry policy, Retry-After, rate limit.

Requests go through urllib3's thread-safe connection pools (the layer under requests):
measured on loopback, 224 us of client CPU per request against 612 us through a
requests.Session, which matters when Metronome's 100-event cap means hundreds of
requests per second. Proxies come from the environment (HTTPS_PROXY, NO_PROXY, ...),
certificates from certifi (or REQUESTS_CA_BUNDLE / SSL_CERT_FILE).

The policy follows the billing vendors' SDKs: retry connection errors, timeouts, 408,
409, 429 and 5xx with capped exponential backoff plus jitter, honour Retry-After
(seconds or HTTP date), resend the identical body, never retry other 4xx unchanged.
What an answer *means* (accepted, re-authenticate, content rejected, ...) is decided by
the destination; this module only carries bytes and waits.
"""

from __future__ import annotations

import collections
import email.utils
import logging
import os
import random
import threading
import time
import typing as t
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import backoff
import certifi
import urllib3

from target_usage_billing import __version__

logger = logging.getLogger("target-usage-billing.http")

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
USER_AGENT = f"target-usage-billing/{__version__}"


@dataclass
class Response:
    status: int
    headers: t.Mapping[str, str]
    body: bytes

    def text(self, limit: int = 500) -> str:
        text = self.body[:limit].decode("utf-8", "replace").strip()
        return text + ("..." if len(self.body) > limit else "")


class RetryableFailure(Exception):
    """A transient failure: the request is sent again after a wait."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RetryBudgetExhausted(Exception):
    """Transient failures went on for longer than the retry budget."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_waits(base: float = 0.5, cap: float = 30.0) -> t.Generator[float, t.Any, None]:
    """Wait generator for ``backoff``: it is sent the exception of each failed try.

    Capped exponential with equal jitter; a server's Retry-After, when given, wins.
    """
    attempt = 0
    failure = yield  # primed by backoff with None
    while True:
        ceiling = min(cap, base * (2**attempt))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        retry_after = getattr(failure, "retry_after", None)
        if retry_after is not None:
            delay = retry_after
        attempt += 1
        failure = yield delay


class RateLimiter:
    """Sliding-window client-side limit: at most ``count`` requests per ``seconds``.

    Several windows may apply at once (m3ter: 50/s per org and 5,000 per 5 min per IP).
    """

    def __init__(self, windows: t.Sequence[tuple[int, float]]):
        self.windows = [(count, seconds) for count, seconds in windows if count > 0]
        self._sent = [collections.deque() for _ in self.windows]
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Block until a request may be sent; returns the seconds waited."""
        if not self.windows:
            return 0.0
        waited = 0.0
        with self._lock:  # waiters queue on the lock: first come, first served
            while True:
                now = time.monotonic()
                wait = 0.0
                for (count, seconds), sent in zip(self.windows, self._sent):
                    while sent and sent[0] <= now - seconds:
                        sent.popleft()
                    if len(sent) >= count:
                        wait = max(wait, sent[0] + seconds - now)
                if wait <= 0:
                    for sent in self._sent:
                        sent.append(now)
                    return waited
                time.sleep(wait)
                waited += wait


@dataclass
class TransportStats:
    requests: int = 0
    retries: int = 0
    throttled_seconds: float = 0.0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, status: int | str) -> None:
        with self.lock:
            self.requests += 1
            self.statuses[str(status)] += 1

    def retried(self) -> None:
        with self.lock:
            self.retries += 1


class HttpTransport:
    """Sends requests over pooled keep-alive connections (safe to share between threads)."""

    def __init__(
        self,
        *,
        timeout_seconds: float = 60.0,
        connect_timeout_seconds: float = 10.0,
        retry_budget_seconds: float = 600.0,
        backoff_base_seconds: float = 0.5,
        backoff_cap_seconds: float = 30.0,
        max_connections: int = 10,
    ):
        self.timeout = urllib3.Timeout(connect=connect_timeout_seconds, read=timeout_seconds)
        self.retry_budget_seconds = retry_budget_seconds
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_cap_seconds = backoff_cap_seconds
        self.stats = TransportStats()
        self._pool_options = {
            "maxsize": max_connections,
            "block": False,
            "retries": False,  # retries are ours, with the same body and id
            "timeout": self.timeout,
            "headers": {"User-Agent": USER_AGENT},
            "ca_certs": (
                os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or certifi.where()
            ),
        }
        self._managers: dict[str, urllib3.PoolManager] = {}
        self._lock = threading.Lock()

    def _manager(self, url: str) -> urllib3.PoolManager:
        """One pool manager per origin, through the environment's proxy when it applies."""
        parts = urllib.parse.urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        manager = self._managers.get(origin)
        if manager is None:
            with self._lock:
                manager = self._managers.get(origin)
                if manager is None:
                    proxy = urllib.request.getproxies().get(parts.scheme)
                    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
                        manager = urllib3.ProxyManager(proxy, **self._pool_options)
                    else:
                        manager = urllib3.PoolManager(num_pools=4, **self._pool_options)
                    self._managers[origin] = manager
        return manager

    def send_once(self, method: str, url: str, headers: t.Mapping[str, str], body: bytes | None) -> Response:
        """One request; connection errors and timeouts become RetryableFailure."""
        try:
            answer = self._manager(url).urlopen(
                method, url, body=body, headers=dict(headers), retries=False, redirect=False
            )
        except urllib3.exceptions.TimeoutError:
            self.stats.count("timeout")
            raise RetryableFailure(f"{method} {_no_query(url)}: timed out") from None
        except urllib3.exceptions.HTTPError as exc:
            self.stats.count("connection error")
            reason = _short_reason(exc)
            raise RetryableFailure(f"{method} {_no_query(url)}: connection failed ({reason})") from None
        self.stats.count(answer.status)
        return Response(answer.status, answer.headers, answer.data)

    def with_retries(self, attempt: t.Callable[[], t.Any], what: str) -> t.Any:
        """Call ``attempt`` until it stops raising RetryableFailure or the budget is spent."""

        def on_backoff(details: dict) -> None:
            self.stats.retried()
            exc = details.get("exception")
            logger.warning("%s: %s; retry %d in %.1fs", what, exc, details["tries"], details["wait"])

        retrying = backoff.on_exception(
            backoff_waits,
            RetryableFailure,
            max_time=self.retry_budget_seconds,
            jitter=None,  # backoff_waits jitters itself and must not shorten Retry-After
            on_backoff=on_backoff,
            base=self.backoff_base_seconds,
            cap=self.backoff_cap_seconds,
            logger=None,
        )(attempt)
        try:
            return retrying()
        except RetryableFailure as exc:
            msg = f"{what}: still failing after the {self.retry_budget_seconds:g}s retry budget: {exc}"
            raise RetryBudgetExhausted(msg) from None


def retryable_status(response: Response, what: str) -> RetryableFailure | None:
    """A RetryableFailure for 408/409/429/5xx answers, else None."""
    if response.status in RETRY_STATUSES or response.status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return RetryableFailure(f"{what} answered {response.status}", retry_after)
    return None


def _short_reason(exc: Exception) -> str:
    text = str(exc)
    for marker in (
        "Connection refused",
        "Connection aborted",
        "Connection reset",
        "RemoteDisconnected",
        "Name or service not known",
        "Remote end closed connection",
    ):
        if marker in text:
            return marker
    return type(exc).__name__


def _no_query(url: str) -> str:
    return url.split("?", 1)[0]
