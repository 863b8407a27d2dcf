"""Unit tests of the retry policy pieces: Retry-After, waits, rate limiting, retries."""

from __future__ import annotations

import email.utils
import gc
import itertools
import socket
import ssl
import subprocess
import time

import pytest

from target_usage_billing.http import HttpTransport
from target_usage_billing.ratelimit import RateLimiter
from target_usage_billing.retry import (
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
    assert waited[0] == 0.0
    assert all(wait > 0 for wait in waited[1:])  # spaced 0.1 s apart, not 3 at once


class _Clock:
    """Time that passes only when the limiter sleeps (``late``: how much later than asked
    each sleeper wakes, as a thread waiting for the interpreter lock does)."""

    def __init__(self, late: float = 0.0):
        self.now, self.late = 1000.0, late

    def sleep(self, seconds: float) -> None:
        self.now += seconds + self.late


def _send_times(limiter: RateLimiter, clock: _Clock, requests: int) -> list[float]:
    times = []
    for _ in range(requests):
        limiter.acquire()
        times.append(clock.now)
    return times


def test_rate_limiter_spaces_requests_evenly_instead_of_letting_a_window_out_at_once():
    clock = _Clock()
    limiter = RateLimiter([(50, 1.0), (5000, 300.0)], clock=lambda: clock.now, sleep=clock.sleep)
    times = _send_times(limiter, clock, 200)
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(times)}
    assert gaps == {0.02}  # 1.0 s / 50: the fastest window's rate, not bursts of 50
    assert all(sum(1 for x in times if start <= x < start + 1.0) <= 50 for start in times)


def test_a_rate_limiter_waking_late_keeps_its_rate_and_its_windows():
    clock = _Clock(late=0.007)  # each sleeper wakes 7 ms late (a third of the spacing)
    limiter = RateLimiter([(50, 1.0)], clock=lambda: clock.now, sleep=clock.sleep)
    times = _send_times(limiter, clock, 501)
    # 500 spacings of 20 ms, late wake-ups made up (added to every gap: 13.5 s); a
    # request that meets a window's edge exactly may lose its 7 ms, once a second
    assert times[-1] - times[0] <= 500 * 0.02 + 10 * 0.007 + 1e-6
    assert all(sum(1 for x in times if start <= x < start + 1.0) <= 50 for start in times)
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.02 - 0.007 - 1e-9  # never a burst


def test_a_rate_limiter_idle_for_a_while_sends_at_once_then_spaced_again():
    clock = _Clock()
    limiter = RateLimiter([(50, 1.0)], clock=lambda: clock.now, sleep=clock.sleep)
    _send_times(limiter, clock, 10)
    clock.now += 60.0  # nothing to send for a minute
    assert limiter.acquire() == 0.0  # the first after it goes at once
    times = [clock.now, *_send_times(limiter, clock, 60)]
    assert {round(b - a, 6) for a, b in itertools.pairwise(times)} == {0.02}  # no burst to catch up


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


# --- the transport over real loopback sockets ----------------------------------------


class _Server:
    """A loopback HTTP/1.1 server in a thread, answering each request as ``behaviour``
    says: "ok" (200, connection kept), "ok-then-close" (200, then the connection is
    closed without saying so: a kept-alive connection gone stale), "silent" (reads the
    request, never answers), "trickle-head" (the status line and headers one byte every
    0.2 s, then the body at once), "trickle-head-once" (so for the first answer only)."""

    def __init__(self, behaviour: str, tls: ssl.SSLContext | None = None):
        import socket
        import threading

        self.behaviour = behaviour
        self.tls = tls
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed_by_client = 0
        self.trickles: list[str] = []  # each trickled answer: "cut off" or "whole head sent"
        self._socket = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self._socket.getsockname()[1]}"
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import threading

        while not self._stop:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection) -> None:
        if self.tls is not None:
            try:
                connection = self.tls.wrap_socket(connection, server_side=True)
            except (ssl.SSLError, OSError):  # the client refused our certificate
                connection.close()
                return
        with connection:
            buffered = b""
            while True:
                while b"\r\n\r\n" not in buffered:
                    try:
                        chunk = connection.recv(65536)
                    except ConnectionResetError:  # closed by the client with our answer unread
                        return
                    if not chunk:
                        self.closed_by_client += 1
                        return
                    buffered += chunk
                head, _, rest = buffered.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(rest) < length:
                    rest += connection.recv(65536)
                self.requests.append(head)
                buffered = rest[length:]
                if self.behaviour == "silent":
                    time.sleep(5)
                    return
                head, body = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", b"ok"
                if self.behaviour == "trickle-head" or (
                    self.behaviour == "trickle-head-once" and not self.trickles
                ):
                    mine = len(self.trickles)  # answers on other connections may be trickling too
                    self.trickles.append("under way")
                    try:
                        for byte in head:
                            time.sleep(0.2)
                            connection.sendall(bytes([byte]))
                    except OSError:  # the client gave up on the answer and closed the connection
                        self.trickles[mine] = "cut off"
                        return
                    self.trickles[mine] = "whole head sent"
                    head = b""
                connection.sendall(head + body)
                if self.behaviour == "ok-then-close":
                    return

    def trickled(self) -> list[str]:
        """How each trickled answer ended, once none is under way any more."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "under way" in self.trickles:
            time.sleep(0.05)
        return list(self.trickles)

    def close(self) -> None:
        self._stop = True
        self._socket.close()


@pytest.fixture
def server_factory():
    servers: list[_Server] = []

    def start(behaviour: str = "ok", tls: ssl.SSLContext | None = None) -> _Server:
        servers.append(_Server(behaviour, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_silent_server_is_a_retryable_timeout(server_factory):
    server = server_factory("silent")
    transport = HttpTransport(timeout_seconds=0.3)
    message = (
        r"^POST http://127\.0\.0\.1:\d+/v1/ingest: timed out: "
        r"the whole answer took longer than the 0\.3s timeout$"
    )
    with pytest.raises(RetryableFailure, match=message):
        transport.send_once("POST", f"{server.url}/v1/ingest", {}, b"[]")
    assert transport.stats.statuses["timeout"] == 1


def test_headers_trickled_within_each_read_timeout_are_cut_off_by_the_request_timeout(server_factory):
    # every header byte comes 0.2 s after the last, well within the 1 s timeout of one
    # read, but the status line and headers together take 7 s
    server = server_factory("trickle-head-once")
    transport = HttpTransport(timeout_seconds=1)
    url = f"{server.url}/v1/ingest"
    with pytest.raises(RetryableFailure, match=r"timed out.*the whole answer took longer than the 1s"):
        transport.send_once("POST", url, {}, b"[]")
    assert transport.stats.statuses == {"timeout": 1}
    answer = transport.send_once("POST", url, {}, b"[]")  # the server answers at once now
    assert (answer.status, answer.body) == (200, b"ok")
    assert server.connections == 2  # the connection cut off mid-answer was not used again
    assert len(server.requests) == 2
    assert server.trickled() == ["cut off"]  # before the headers were all in


def test_headers_trickled_on_every_try_exhaust_the_retry_budget(server_factory):
    server = server_factory("trickle-head")
    transport = HttpTransport(
        timeout_seconds=1, retry_budget_seconds=1.5, backoff_base_seconds=0.05, backoff_cap_seconds=0.05
    )
    url = f"{server.url}/v1/ingest"
    with pytest.raises(
        RetryBudgetExhausted, match=r"retry budget: .*the whole answer took longer than the 1s"
    ):
        transport.with_retries(lambda: transport.send_once("POST", url, {}, b"[]"), f"POST {url}")
    assert transport.stats.statuses["timeout"] >= 2
    assert transport.stats.retries == transport.stats.statuses["timeout"] - 1
    assert set(server.trickled()) == {"cut off"}


def test_headers_trickled_over_tls_are_cut_off_too(server_factory, monkeypatch, tmp_path):
    cert, key = _certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = server_factory("trickle-head-once", tls=context)
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    transport = HttpTransport(timeout_seconds=1)
    with pytest.raises(RetryableFailure, match="the whole answer took longer than the 1s"):
        transport.send_once("GET", f"{server.url}/", {}, None)
    answer = transport.send_once("GET", f"{server.url}/", {}, None)
    assert (answer.status, answer.body) == (200, b"ok")
    assert server.trickled() == ["cut off"]


def test_a_refused_connection_is_retryable_and_named():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]  # nothing listens there once closed
    transport = HttpTransport()
    with pytest.raises(RetryableFailure, match=r"connection failed \(Connection refused\)") as raised:
        transport.send_once("GET", f"http://127.0.0.1:{port}/v1/customers?key=secret", {}, None)
    assert "secret" not in str(raised.value)  # the query is left out of messages
    assert transport.stats.statuses["connection error"] == 1


def test_connections_the_server_closed_are_replaced_without_a_retry(server_factory):
    server = server_factory("ok-then-close")
    transport = HttpTransport()
    for _ in range(5):
        answer = transport.send_once("POST", f"{server.url}/v1/ingest", {}, b"[1]")
        assert (answer.status, answer.body) == (200, b"ok")
    assert transport.stats.statuses == {"200": 5}  # no failure counted
    assert server.connections == 5


def test_one_kept_alive_connection_carries_the_requests_with_our_headers(server_factory):
    server = server_factory("ok")
    transport = HttpTransport()
    for _ in range(3):
        transport.send_once("POST", f"{server.url}/v1/ingest?x=1", {"Authorization": "Bearer t"}, b"[1, 2]")
    assert server.connections == 1
    head = server.requests[-1].decode()
    assert head.startswith("POST /v1/ingest?x=1 HTTP/1.1\r\n")
    for header in ("Authorization: Bearer t", "Content-Length: 6", "User-Agent: target-usage-billing/"):
        assert f"\r\n{header}" in head


def test_more_origins_than_pools_are_each_reached_and_all_closed_at_the_end(server_factory):
    servers = [server_factory("ok") for _ in range(6)]  # the pool manager keeps 4 pools
    transport = HttpTransport()
    for _ in range(2):
        for server in servers:
            assert transport.send_once("GET", f"{server.url}/", {}, None).status == 200
    assert all(len(server.requests) == 2 for server in servers)
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transport.close_connections()
        gc.collect()  # a socket left open warns when it is collected
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(s.closed_by_client < s.connections for s in servers):
        time.sleep(0.02)
    assert [s.closed_by_client for s in servers] == [s.connections for s in servers]


def test_a_line_break_in_a_header_is_a_clear_error_that_never_quotes_it(server_factory):
    from target_usage_billing.errors import DeliveryError

    server = server_factory("ok")
    transport = HttpTransport()
    with pytest.raises(DeliveryError) as raised:
        transport.send_once("POST", f"{server.url}/v1/ingest", {"Authorization": "Bearer se\ncret"}, b"[]")
    assert "forbids" in str(raised.value) and "cret" not in str(raised.value)
    assert server.requests == []


def test_failures_outside_the_transport_categories_are_not_hidden():
    from target_usage_billing.http import _failure

    assert _failure(KeyError("bug"), "GET /") is None


# --- the requests internals http.py builds on ---------------------------------------------
# HttpTransport asks requests' HTTPAdapter for a request's pool
# (get_connection_with_tls_context), its TLS settings (cert_verify), its request target
# (request_url) and its retry setting (max_retries), then calls the pool's urlopen as
# HTTPAdapter.send does. These tests send through that path for real, over loopback, and
# fail by name if a requests release changes what any of them does.


def test_requests_adapter_pools_are_the_ones_requests_itself_uses(server_factory):
    server = server_factory("ok")
    transport = HttpTransport()
    url = f"{server.url}/v1/ingest?x=1"
    assert transport.send_once("POST", url, {}, b"[]").status == 200
    route = transport._local.routes[url.split("?")[0]]  # one route per endpoint, queries apart
    # requests' own send, on the same session, finds the connection ours left in the pool
    own = transport._session().post(url, data=b"[]", verify=transport._verify, timeout=5)
    assert own.status_code == 200
    assert server.connections == 1, (
        "HTTPAdapter.get_connection_with_tls_context no longer gives the pool requests' own "
        "send uses for the URL"
    )
    assert route.target == "/v1/ingest", "HTTPAdapter.request_url no longer gives the path"
    assert server.requests[-1].startswith(b"POST /v1/ingest?x=1 HTTP/1.1\r\n")
    assert route.retries.total == 0, "HTTPAdapter(max_retries=0) no longer means no urllib3 retries"


def test_requests_adapter_gives_the_absolute_url_through_a_plain_http_proxy(server_factory, monkeypatch):
    proxy = server_factory("ok")  # answers as a forward proxy would, and records what came
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    transport = HttpTransport()
    answer = transport.send_once("POST", "http://billing.invalid:8080/v1/ingest?x=1", {}, b"[]")
    assert answer.status == 200
    head = proxy.requests[-1].decode()
    assert head.startswith("POST http://billing.invalid:8080/v1/ingest?x=1 HTTP/1.1\r\n"), (
        "HTTPAdapter.request_url / get_connection_with_tls_context(proxies=...) no longer send "
        f"a plain-HTTP request to the proxy with the whole URL: {head.splitlines()[0]!r}"
    )
    assert "\r\nHost: billing.invalid:8080" in head


def _certificate(directory) -> tuple[str, str]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def test_requests_adapter_verifies_tls_with_the_ca_bundle_given(server_factory, monkeypatch, tmp_path):
    from target_usage_billing.errors import DeliveryError

    cert, key = _certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = server_factory("ok", tls=context)
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DeliveryError, match="TLS certificate is not trusted"):
        HttpTransport().send_once("GET", f"{server.url}/", {}, None)  # certifi's bundle only
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    trusting = HttpTransport()
    answer = trusting.send_once("GET", f"{server.url}/", {}, None)
    assert (answer.status, answer.body) == (200, b"ok"), (
        "HTTPAdapter.cert_verify no longer gives the pool the CA bundle"
    )
    pool = trusting._local.routes[f"{server.url}/"].pool
    assert (pool.cert_reqs, pool.ca_certs) == ("CERT_REQUIRED", cert)


def test_a_failed_attempt_leaves_no_cycle_holding_its_request_body():
    # The GC runs rarely in a run (target.py raises its thresholds), so a frame kept alive
    # by a cycle with its own exception would hold the request body through a storm.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]  # closed again: connections are refused
    transport = HttpTransport(timeout_seconds=1)
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            with pytest.raises(RetryableFailure):
                transport.send_once("POST", f"http://127.0.0.1:{port}/v1/ingest", {}, b"x" * 100_000)
        frames = [o for o in gc.get_objects() if type(o).__name__ == "frame"]
        frames = [frame for frame in frames if frame.f_code.co_name == "send_once"]
    finally:
        gc.enable()
    assert frames == []


def test_one_route_per_endpoint_whatever_its_query(server_factory):
    # Orb names each backfill in ?backfill_id=: a route (and its pool) per query would grow
    # with the backfills of a run, in every worker thread
    server = server_factory()
    transport = HttpTransport(timeout_seconds=5)
    for number in range(20):
        answer = transport.send_once("POST", f"{server.url}/v1/ingest?backfill_id=b{number}", {}, b"[]")
        assert answer.status == 200
    transport.send_once("POST", f"{server.url}/v1/ingest", {}, b"[]")
    assert len(transport._local.routes) == 1
    lines = [head.split(b"\r\n", 1)[0] for head in server.requests]
    assert lines[:2] == [
        b"POST /v1/ingest?backfill_id=b0 HTTP/1.1",
        b"POST /v1/ingest?backfill_id=b1 HTTP/1.1",
    ]
    assert lines[-1] == b"POST /v1/ingest HTTP/1.1"
    assert server.connections == 1  # one kept-alive connection carried them all


def test_an_attempt_made_while_handling_an_error_leaves_that_error_s_traceback_alone():
    # e.g. Orb's backfills reverted while the run stops on another error, re-raised after
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    transport = HttpTransport(timeout_seconds=1)
    try:
        raise ValueError("the run's own error")
    except ValueError as outer:
        with pytest.raises(RetryableFailure) as failed:
            transport.send_once("POST", f"http://127.0.0.1:{port}/v1/ingest", {}, b"[]")
        assert failed.value.__context__ is not None  # the attempt's own chain, frames let go
        assert outer.__traceback__ is not None
        assert outer.__traceback__.tb_frame.f_code.co_name.startswith("test_an_attempt")
