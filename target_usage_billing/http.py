"""HTTP transport: requests sessions, the retry policy, Retry-After, rate limiting.

All HTTP goes through ``requests`` (one Session per delivery thread, see HttpTransport),
which brings what enterprise networks use: HTTP(S)_PROXY, ALL_PROXY, NO_PROXY with CIDR
ranges, ``https://`` proxies and, with the ``socks`` extra, ``socks5h://`` ones; CA
bundles from REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE or SSL_CERT_FILE (else certifi's).

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
import math
import os
import random
import threading
import time
import typing as t
import urllib.parse
from dataclasses import dataclass, field

import backoff
import certifi
import requests
import requests.structures
import requests.utils
from backoff.types import Details
from requests.adapters import HTTPAdapter

from target_usage_billing import __version__
from target_usage_billing.errors import DeliveryError

logger = logging.getLogger("target-usage-billing.http")

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
USER_AGENT = f"target-usage-billing/{__version__}"
_DEFAULT_HEADERS = {
    "User-Agent": USER_AGENT,
    "Accept": "*/*",
    "Accept-Encoding": "gzip, deflate",
    "Connection": "keep-alive",
}


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


class RetryBudgetExhausted(DeliveryError):
    """Transient failures went on for longer than the retry budget."""


def transient(response: Response) -> bool:
    """Whether an error answer is worth sending again unchanged: the vendors' SDKs' rule.

    ``x-should-retry: true|false`` from the server decides; otherwise 408, 409, 429 and
    5xx are transient and every other status is not.
    """
    hint = response.headers.get("x-should-retry")
    if hint is not None and hint.strip().lower() in ("true", "false"):
        return hint.strip().lower() == "true"
    return response.status in RETRY_STATUSES or response.status >= 500


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


def backoff_waits(base: float = 0.5, cap: float = 30.0) -> t.Generator[float, t.Any, None]:
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


class RateLimiter:
    """Sliding-window client-side limit: at most ``count`` requests per ``seconds``.

    Several windows may apply at once (m3ter: 50/s per org and 5,000 per 5 min per IP).
    """

    def __init__(self, windows: t.Sequence[tuple[int, float]]):
        self.windows = [(count, seconds) for count, seconds in windows if count > 0]
        self._sent: list[collections.deque[float]] = [collections.deque() for _ in self.windows]
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
    """Answers by status (or "timeout", "connection error"), retries, rate-limit waits."""

    retries: int = 0
    throttled_seconds: float = 0.0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, status: int | str) -> None:
        with self.lock:
            self.statuses[str(status)] += 1

    def retried(self) -> None:
        with self.lock:
            self.retries += 1

    def throttled(self, seconds: float) -> None:
        if seconds:
            with self.lock:
                self.throttled_seconds += seconds


class HttpTransport:
    """Sends requests through one ``requests.Session`` per delivery thread.

    A Session is not documented as safe to share between threads, so each thread keeps
    its own, with a keep-alive pool sized for one request at a time. What the
    environment says (proxies, CA bundle) is read once per origin rather than per request
    (``requests`` scans the whole environment on every request otherwise, and Meltano's
    is large), and ``trust_env`` is off so that a ``~/.netrc`` entry for the API host
    cannot replace the Authorization header (psf/requests#3929). Redirects are not
    followed: an ingest endpoint that redirects is misconfigured.
    """

    def __init__(
        self,
        *,
        timeout_seconds: float = 60.0,
        connect_timeout_seconds: float = 10.0,
        retry_budget_seconds: float = 600.0,
        backoff_base_seconds: float = 0.5,
        backoff_cap_seconds: float = 30.0,
    ):
        self.read_timeout = timeout_seconds
        self.connect_timeout = connect_timeout_seconds
        self.retry_budget_seconds = retry_budget_seconds
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_cap_seconds = backoff_cap_seconds
        self.stats = TransportStats()
        self._verify: str = (
            os.environ.get("REQUESTS_CA_BUNDLE")
            or os.environ.get("CURL_CA_BUNDLE")
            or os.environ.get("SSL_CERT_FILE")
            or certifi.where()
        )
        self._proxies: dict[str, dict[str, str]] = {}
        self._templates: dict[tuple[str, str], requests.PreparedRequest] = {}
        self._local = threading.local()
        # The retry policy, built once (not per request): calls attempt(), waits, again.
        self._retrying = backoff.on_exception(
            backoff_waits,
            RetryableFailure,
            max_time=self.retry_budget_seconds,
            jitter=None,  # backoff_waits jitters itself and must not shorten Retry-After
            on_backoff=self._on_backoff,
            base=self.backoff_base_seconds,
            cap=self.backoff_cap_seconds,
            logger=None,
        )(_call)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # proxies and CA come from _proxies_for / _verify
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=2, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session  # headers come whole from _prepare
        return session

    def _proxies_for(self, url: str) -> dict[str, str]:
        """The environment's proxies for ``url``'s origin (HTTP(S)_PROXY, ALL_PROXY, and
        NO_PROXY with host names, domains and CIDR ranges), worked out once per origin."""
        parts = urllib.parse.urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        found = self._proxies.get(origin)
        if found is None:
            found = self._proxies[origin] = requests.utils.get_environ_proxies(url)
        return found

    def send_once(self, method: str, url: str, headers: t.Mapping[str, str], body: bytes | None) -> Response:
        """One request; connection errors and timeouts become RetryableFailure."""
        session = self._session()
        proxies = self._proxies_for(url)
        for attempt in (1, 2):
            try:
                reply = session.send(
                    self._prepare(method, url, headers, body),
                    proxies=proxies,
                    verify=self._verify,
                    timeout=(self.connect_timeout, self.read_timeout),
                    allow_redirects=False,
                )
                data = reply.content
            except requests.exceptions.SSLError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc):
                    msg = (
                        f"{method} {_no_query(url)}: the server's TLS certificate is not trusted; for a "
                        "private CA set SSL_CERT_FILE or REQUESTS_CA_BUNDLE"
                    )
                    raise DeliveryError(msg) from None
                self.stats.count("connection error")
                raise RetryableFailure(
                    f"{method} {_no_query(url)}: TLS failed ({_short_reason(exc)})"
                ) from None
            except requests.exceptions.Timeout:
                self.stats.count("timeout")
                raise RetryableFailure(f"{method} {_no_query(url)}: timed out") from None
            except requests.exceptions.ConnectionError as exc:
                reason = _short_reason(exc)
                if attempt == 1 and reason in _STALE_REASONS:
                    continue  # the server closed an idle kept-alive connection: reconnect now
                self.stats.count("connection error")
                raise RetryableFailure(f"{method} {_no_query(url)}: connection failed ({reason})") from None
            except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, ValueError):
                # A header or URL with a line break: the library's message would quote the
                # header (a credential). Say what, never the value.
                msg = (
                    f"{method} {_no_query(url)}: a request header or the URL holds a character HTTP "
                    "forbids (check the credential and URL settings for line breaks)"
                )
                raise DeliveryError(msg) from None
            except requests.exceptions.RequestException as exc:
                self.stats.count("connection error")
                reason = type(exc).__name__
                raise RetryableFailure(f"{method} {_no_query(url)}: request failed ({reason})") from None
            self.stats.count(reply.status_code)
            return Response(reply.status_code, reply.headers, data)
        raise AssertionError("unreachable")  # pragma: no cover

    def _prepare(
        self, method: str, url: str, headers: t.Mapping[str, str], body: bytes | None
    ) -> requests.PreparedRequest:
        """The request, from a template prepared once per method and URL.

        Session.request parses and re-validates the URL, merges settings and cookies on
        every call: a third of requests' CPU per request, which Metronome's many small
        requests make count. Copying a prepared template and setting headers and body is
        what remains of it here.
        """
        key = (method, url)
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = requests.Request(method, url).prepare()
        prepared = template.copy()
        prepared.headers = requests.structures.CaseInsensitiveDict({**_DEFAULT_HEADERS, **headers})
        prepared.body = body
        if body is not None:
            prepared.headers["Content-Length"] = str(len(body))
        return prepared

    def close_connections(self) -> None:
        """Close the calling thread's kept-alive connections (each thread, when it is done)."""
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None

    def with_retries(self, attempt: t.Callable[[], t.Any], what: str) -> t.Any:
        """Call ``attempt`` until it stops raising RetryableFailure or the budget is spent."""
        try:
            return self._retrying(attempt, what)
        except RetryableFailure as exc:
            msg = f"{what}: still failing after the {self.retry_budget_seconds:g}s retry budget: {exc}"
            raise RetryBudgetExhausted(msg) from None

    def _on_backoff(self, details: Details) -> None:
        self.stats.retried()
        _attempt, what = details["args"]
        exc = details.get("exception")
        wait = details["wait"]
        asked = getattr(exc, "retry_after", None)
        if asked is not None and asked > wait + 1:
            logger.warning(
                "%s: %s; the server asked to wait %.0fs, longer than what is left of the %gs retry "
                "budget (max_retry_seconds): one last try in %.1fs",
                what,
                exc,
                asked,
                self.retry_budget_seconds,
                wait,
            )
            return
        logger.warning("%s: %s; retry %d in %.1fs", what, exc, details["tries"], wait)


def retryable_status(response: Response, what: str) -> RetryableFailure | None:
    """A RetryableFailure for a transient error answer (see ``transient``), else None."""
    if response.status >= 300 and transient(response):
        return RetryableFailure(f"{what} answered {response.status}", retry_after_seconds(response.headers))
    return None


def _call(attempt: t.Callable[[], t.Any], what: str) -> t.Any:
    return attempt()


# Reasons that mean a kept-alive connection had been closed by the server before we used
# it; the request is sent once more on a fresh connection at once (ids make it safe).
_STALE_REASONS = (
    "RemoteDisconnected",
    "Remote end closed connection",
    "Connection reset",
    "Connection aborted",
)


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
