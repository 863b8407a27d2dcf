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


# --- the transport over real loopback sockets ----------------------------------------


class _Server:
    """A loopback HTTP/1.1 server in a thread, answering each request as ``behaviour``
    says: "ok" (200, connection kept), "ok-then-close" (200, then the connection is
    closed without saying so: a kept-alive connection gone stale), "silent" (reads the
    request, never answers)."""

    def __init__(self, behaviour: str):
        import socket
        import threading

        self.behaviour = behaviour
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed_by_client = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
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
        with connection:
            buffered = b""
            while True:
                while b"\r\n\r\n" not in buffered:
                    chunk = connection.recv(65536)
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
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                if self.behaviour == "ok-then-close":
                    return

    def close(self) -> None:
        self._stop = True
        self._socket.close()


@pytest.fixture
def server_factory():
    servers: list[_Server] = []

    def start(behaviour: str = "ok") -> _Server:
        servers.append(_Server(behaviour))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_silent_server_is_a_retryable_timeout(server_factory):
    server = server_factory("silent")
    transport = HttpTransport(timeout_seconds=0.3)
    with pytest.raises(RetryableFailure, match=r"^POST http://127\.0\.0\.1:\d+/v1/ingest: timed out$"):
        transport.send_once("POST", f"{server.url}/v1/ingest", {}, b"[]")
    assert transport.stats.statuses["timeout"] == 1


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
