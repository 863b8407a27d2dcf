"""HTTP transport: requests sessions, sending with retries, whole answers read within a deadline.

All HTTP goes through ``requests`` (one Session per delivery thread, see HttpTransport),
which brings what enterprise networks use: HTTP(S)_PROXY, ALL_PROXY, NO_PROXY with CIDR
ranges, ``https://`` proxies and, with the ``socks`` extra, ``socks5h://`` ones; CA
bundles from REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE or SSL_CERT_FILE (else certifi's).

The retry policy (retry.py) follows the billing vendors' SDKs: retry connection errors,
timeouts, 408, 409, 429 and 5xx with capped exponential backoff plus jitter, honour
Retry-After (seconds or HTTP date), resend the identical body, never retry other 4xx
unchanged; its numbers are in constants.py, the rate limiter in ratelimit.py.
What an answer *means* (accepted, re-authenticate, content rejected, ...) is decided by
the destination; this module only carries bytes and waits.
"""

from __future__ import annotations

import collections
import functools
import http.client
import io
import logging
import os
import ssl
import sys
import threading
import time
import typing as t
import urllib.parse
from dataclasses import dataclass, field

import backoff
import certifi
import requests
import requests.utils
import urllib3.exceptions
from backoff.types import Details
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
)
from urllib3.util import Retry, Timeout

from target_usage_billing import __version__
from target_usage_billing.constants import (
    CONNECT_TIMEOUT_SECONDS,
    DEFAULT_RETRY_BUDGET_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    INITIAL_RETRY_DELAY_SECONDS,
    MAX_ANSWER_BYTES,
    MAX_RETRY_DELAY_SECONDS,
    POOL_CONNECTIONS,
    POOL_MAXSIZE,
)
from target_usage_billing.errors import DeliveryError, drop_frames
from target_usage_billing.retry import RetryableFailure, RetryBudgetExhausted, backoff_waits

logger = logging.getLogger("target-usage-billing.http")

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

    requests decides, once per thread and URL, everything that depends on the network:
    the connection pool (direct, through an HTTP(S) or SOCKS proxy, TLS with the CA
    bundle) and the request target (the path, or the whole URL through a plain-HTTP
    proxy). Each request then goes to that pool's ``urlopen`` exactly as requests'
    HTTPAdapter.send calls it, with the same retry setting, so errors come in the same
    shapes; what requests adds per request on top (prepared-request copies, cookie
    jars, hooks, a Response object, the pool lookup again) was 40 % of the client CPU of
    a request, and Metronome sends one every 100 events (benchmarks/http_cost.py).
    """

    def __init__(
        self,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS,
        retry_budget_seconds: float = DEFAULT_RETRY_BUDGET_SECONDS,
        backoff_base_seconds: float = INITIAL_RETRY_DELAY_SECONDS,
        backoff_cap_seconds: float = MAX_RETRY_DELAY_SECONDS,
    ):
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
        self._timeout = Timeout(connect=connect_timeout_seconds, read=timeout_seconds)
        # the whole request and its answer, status line and headers included, not each
        # socket read: a server trickling bytes is cut off too (_AnswerWithinDeadline)
        self._answer_seconds = timeout_seconds
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
            adapter = HTTPAdapter(pool_connections=POOL_CONNECTIONS, pool_maxsize=POOL_MAXSIZE, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            self._local.routes = {}
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

    def _route(self, method: str, url: str) -> _Route:
        """This thread's way to ``url``, as requests' HTTPAdapter works it out."""
        session = self._session()
        # one route per endpoint, whatever its query (Orb's ?backfill_id= names one of many)
        url, _, query = url.partition("?")
        route: _Route | None = self._local.routes.get(url)
        if route is not None and route.pool.pool is not None:
            return route._replace(target=f"{route.target}?{query}") if query else route
        # none yet, or the pool was closed
        adapter = t.cast(HTTPAdapter, session.get_adapter(url))
        proxies = self._proxies_for(url)
        prepared = requests.Request(method, url).prepare()
        pool = t.cast(
            HTTPConnectionPool,
            adapter.get_connection_with_tls_context(prepared, self._verify, proxies=proxies),
        )
        adapter.cert_verify(pool, url, self._verify, None)
        if getattr(pool.ConnectionCls, "response_class", None) is not _AnswerWithinDeadline:
            # direct, TLS, proxied, SOCKS: the pool's own kind of connection, reading
            # its answers (CONNECT's to a proxy too) within the request's deadline
            pool.ConnectionCls = _answering_within_deadline(pool.ConnectionCls)
        route = _Route(pool, adapter.request_url(prepared, proxies), adapter.max_retries)
        self._local.routes[url] = route
        return route._replace(target=f"{route.target}?{query}") if query else route

    def send_once(self, method: str, url: str, headers: t.Mapping[str, str], body: bytes | None) -> Response:
        """One request; connection errors and timeouts become RetryableFailure."""
        sent = {**_DEFAULT_HEADERS, **headers}
        if body is not None:
            sent["Content-Length"] = str(len(body))
        what = f"{method} {_no_query(url)}"
        handled = sys.exc_info()[1]  # called while handling another error: its frames are not ours
        for attempt in (1, 2):
            _request_deadline.at = time.monotonic() + self._answer_seconds
            try:
                route = self._route(method, url)
                reply = route.pool.urlopen(
                    method,
                    route.target,
                    body=body,
                    headers=sent,
                    redirect=False,
                    assert_same_host=False,
                    preload_content=False,  # read below, within the request's deadline
                    decode_content=True,
                    retries=route.retries,
                    timeout=self._timeout,
                    chunked=False,
                )
                data = _read_body(reply)
            except Exception as exc:  # sorted by _failure; anything else is a bug: re-raised
                sorted_failure = _failure(exc, what, timeout_seconds=self._answer_seconds)
                if sorted_failure is None:
                    raise
                failure, counted = sorted_failure
                if counted == _STALE:
                    if attempt == 1:
                        continue  # the server closed an idle kept-alive connection: reconnect now
                    counted = "connection error"
                if counted is not None:
                    self.stats.count(counted)
                drop_frames(exc, handled)
                try:
                    raise failure from None
                finally:  # its traceback holds this frame (and the body): no cycle left for the GC
                    failure = sorted_failure = None  # type: ignore[assignment]
            finally:
                _request_deadline.at = None
            self.stats.count(reply.status)
            return Response(reply.status, reply.headers, data)
        raise AssertionError("unreachable")  # pragma: no cover

    def close_connections(self) -> None:
        """Close the calling thread's kept-alive connections (each thread, when it is done)."""
        session = getattr(self._local, "session", None)
        if session is not None:
            # a pool the manager no longer holds (it keeps POOL_CONNECTIONS) is still this thread's route
            for route in self._local.routes.values():
                route.pool.close()
            session.close()
            self._local.session = None
            self._local.routes = {}

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


def _read_body(reply: t.Any) -> bytes:
    """The answer's body (its reads bounded by the request's deadline, as the status line
    and headers were: _AnswerWithinDeadline)."""
    chunks = []
    size = 0
    try:
        while True:
            chunk = reply.read1(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise ProtocolError(f"answer larger than {MAX_ANSWER_BYTES} bytes")
    except BaseException:
        reply.close()  # the connection is in an unknown state: never reused
        raise
    reply.release_conn()
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


# When the request this thread is sending must have had its whole answer
# (time.monotonic), or None: set by send_once, read by the answer it gets. A delivery
# thread sends one request at a time.
_request_deadline = threading.local()


class _ReadsBeforeDeadline(io.RawIOBase):
    """A socket's reader whose every read waits at most what is left until the deadline:
    a per-read socket timeout alone lets a server trickling a byte a little faster than
    it hold the request open for as long as it likes."""

    def __init__(self, raw: io.RawIOBase, sock: t.Any, deadline: float):
        super().__init__()
        self._raw = raw  # the socket's own reader (socket.SocketIO), closed with this one
        self._sock = sock
        self._deadline = deadline
        self._read_timeout = sock.gettimeout()  # urllib3's, per read (the connect timeout for CONNECT)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: t.Any) -> int | None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the whole answer took longer than the timeout")  # as a timed-out read does
        read_timeout = self._read_timeout
        self._sock.settimeout(left if read_timeout is None or left < read_timeout else read_timeout)
        return self._raw.readinto(buffer)

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            try:
                self._raw.close()  # lets the connection's socket really close (socket.makefile)
            finally:
                super().close()


class _AnswerWithinDeadline(http.client.HTTPResponse):
    """http.client's answer, its status line, headers and body read through
    _ReadsBeforeDeadline when a request of ours (send_once) is waiting for it."""

    def __init__(self, sock: t.Any, *args: t.Any, **kwargs: t.Any):
        super().__init__(sock, *args, **kwargs)
        deadline = getattr(_request_deadline, "at", None)  # None: not a request of send_once's
        if deadline is not None:
            # over makefile's own raw reader: the socket really closes only once it is closed
            self.fp = io.BufferedReader(_ReadsBeforeDeadline(self.fp.detach(), sock, deadline))


@functools.cache
def _answering_within_deadline(connection_class: type) -> type:
    """``connection_class`` (urllib3's HTTP, HTTPS or SOCKS connection) answering with
    _AnswerWithinDeadline: http.client builds every answer, a proxy's to CONNECT too, as
    ``self.response_class(self.sock, ...)``."""
    return type(
        connection_class.__name__,
        (connection_class,),
        {"response_class": _AnswerWithinDeadline, "__module__": __name__},
    )


def _call(attempt: t.Callable[[], t.Any], what: str) -> t.Any:
    return attempt()


class _Route(t.NamedTuple):
    pool: HTTPConnectionPool  # requests' pool for the URL: direct, proxied, TLS as configured
    target: str  # the request line's target: the path, or the URL through a plain-HTTP proxy
    retries: Retry  # requests' own setting (no retries: those are backoff's)


_STALE = "stale"  # what _failure calls a kept-alive connection the server had closed


def _failure(
    exc: Exception, what: str, timeout_seconds: float | None = None
) -> tuple[Exception, str | None] | None:
    """What a failed ``urlopen`` means, sorted as requests' HTTPAdapter.send sorts it.

    (the exception to raise, what the transport stats count it as): a RetryableFailure
    counted as "timeout" or "connection error" for what may pass (_STALE when a
    kept-alive connection was closed under us: sent again at once), a DeliveryError,
    not counted, for what sending again cannot mend; None for anything else (a bug:
    re-raised as it is). ``timeout_seconds`` is the request timeout, for the message.
    """
    reason: BaseException = exc.reason if isinstance(exc, MaxRetryError) and exc.reason else exc
    if isinstance(reason, (urllib3.exceptions.SSLError, ssl.SSLError)):
        text = str(reason)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            msg = (
                f"{what}: the server's TLS certificate is not trusted; for a private CA set "
                "SSL_CERT_FILE or REQUESTS_CA_BUNDLE"
            )
            return DeliveryError(msg), None
        return RetryableFailure(f"{what}: TLS failed ({_short_reason(reason)})"), "connection error"
    if isinstance(reason, ReadTimeoutError):
        # every read waits at most what is left of the request's time (_ReadsBeforeDeadline)
        timeout = "the timeout" if timeout_seconds is None else f"the {timeout_seconds:g}s timeout"
        return RetryableFailure(f"{what}: timed out: the whole answer took longer than {timeout}"), "timeout"
    if isinstance(reason, ConnectTimeoutError) and not isinstance(reason, NewConnectionError):
        return RetryableFailure(f"{what}: timed out"), "timeout"
    if isinstance(reason, (urllib3.exceptions.InvalidHeader, ValueError)):  # LocationValueError too
        # A header or URL with a line break: the library's message would quote the
        # header (a credential). Say what, never the value.
        msg = (
            f"{what}: a request header or the URL holds a character HTTP forbids (check the "
            "credential and URL settings for line breaks)"
        )
        return DeliveryError(msg), None
    if isinstance(reason, (ProtocolError, OSError, ClosedPoolError, NewConnectionError, ProxyError)):
        short = _short_reason(reason)
        failure = RetryableFailure(f"{what}: connection failed ({short})")
        return failure, (_STALE if short in _STALE_REASONS else "connection error")
    if isinstance(reason, HTTPError):
        return RetryableFailure(f"{what}: request failed ({type(reason).__name__})"), "connection error"
    return None


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
