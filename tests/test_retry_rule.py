"""The one retry rule, as a table: status x x-should-retry x where the answer is read
(the transport's rule, a destination's judge, a credentials or read request) -> sent
again or not; and the transport's failure conditions (timeouts, refused or dropped
connections, TLS, forbidden characters) -> sent again or not."""

from __future__ import annotations

import socket
import ssl

import pytest
import urllib3.exceptions

from target_usage_billing.constants import RETRY_SERVER_ERRORS_FROM, RETRY_STATUSES
from target_usage_billing.destinations.base import Verdict
from target_usage_billing.destinations.metronome import MetronomeDestination
from target_usage_billing.errors import DeliveryError
from target_usage_billing.http import HttpTransport, Response, _failure
from target_usage_billing.retry import RetryableFailure, retryable_status, should_retry

TRUE = {"x-should-retry": "true"}
FALSE = {"x-should-retry": "false"}
NONE: dict[str, str] = {}

# status, headers, retried?, decided by the server's header?
ANSWERS = [
    (200, NONE, False, False),
    (200, TRUE, False, False),  # a success is never sent again by the rule
    (204, NONE, False, False),
    (302, NONE, False, False),
    (400, NONE, False, False),
    (400, TRUE, True, True),
    (401, NONE, False, False),
    (404, NONE, False, False),
    (408, NONE, True, False),
    (409, NONE, True, False),
    (413, NONE, False, False),
    (422, NONE, False, False),
    (429, NONE, True, False),
    (429, FALSE, False, True),
    (500, NONE, True, False),
    (501, NONE, True, False),
    (503, NONE, True, False),
    (503, FALSE, False, True),
    (503, {"x-should-retry": " TRUE "}, True, True),  # read as the SDKs read it, any case
    (503, {"x-should-retry": "maybe"}, True, False),  # not true/false: the status decides
    (599, NONE, True, False),
]


@pytest.mark.parametrize(("status", "headers", "retried", "by_server"), ANSWERS)
def test_the_retry_rule(status, headers, retried, by_server):
    decision = should_retry(status, headers)
    assert decision.retry is retried
    assert decision.by_server is by_server
    # the transport's form of it carries the server's wait
    failure = retryable_status(Response(status, {**headers, "Retry-After": "7"}, b""), "POST /x")
    assert (failure is not None) is retried
    if failure is not None:
        assert failure.retry_after == 7.0
        assert str(failure) == f"POST /x answered {status}"


def test_the_constants_name_each_transient_status_once():
    assert {408, 409, 429} == RETRY_STATUSES
    assert RETRY_SERVER_ERRORS_FROM == 500
    assert not any(status >= RETRY_SERVER_ERRORS_FROM for status in RETRY_STATUSES)


# status, headers, the ingest answer's verdict (Metronome: a Bearer-key platform whose
# refusals are 401/403 the key, 400/422 the content): the platform's reading of its
# refusals comes after a server's "true" and before a server's "false"
JUDGED = [
    (400, NONE, Verdict.REJECTED),
    (400, TRUE, Verdict.RETRY),
    (401, NONE, Verdict.DENIED),
    (401, TRUE, Verdict.RETRY),
    (401, FALSE, Verdict.DENIED),
    (404, NONE, Verdict.FATAL),
    (408, NONE, Verdict.RETRY),
    (409, NONE, Verdict.RETRY),
    (413, NONE, Verdict.FATAL),
    (422, FALSE, Verdict.REJECTED),
    (429, NONE, Verdict.RETRY),
    (429, FALSE, Verdict.FATAL),
    (500, NONE, Verdict.RETRY),
    (503, FALSE, Verdict.FATAL),
    (302, TRUE, Verdict.FATAL),  # a redirect is never followed, whatever the header
]


@pytest.mark.parametrize(("status", "headers", "verdict"), JUDGED)
def test_a_destination_judges_by_the_same_rule(status, headers, verdict):
    destination = MetronomeDestination({"metronome_api_key": "k"}, HttpTransport())
    ruling = destination.judge(Response(status, headers, b"{}"))
    assert ruling.verdict is verdict, ruling.message
    if verdict is Verdict.RETRY:
        said = " (x-should-retry: true)" if headers is TRUE else ""
        assert ruling.message == f"Metronome answered {status}{said}"


def _refused() -> Exception:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1)
    except OSError as exc:
        return exc
    raise AssertionError("nothing should listen on a port just released")


# the failure (as urllib3 raises it under requests), sent again?, what the stats count
CONDITIONS = [
    (urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out"), True, "timeout"),
    (urllib3.exceptions.ConnectTimeoutError("connect timed out"), True, "timeout"),
    (urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError()), True, "stale"),
    (urllib3.exceptions.ProtocolError("Remote end closed connection"), True, "stale"),
    (urllib3.exceptions.NewConnectionError(None, "Connection refused"), True, "connection error"),
    (urllib3.exceptions.SSLError("handshake failure"), True, "connection error"),
    (ssl.SSLError("certificate verify failed: unable to get local issuer"), False, None),
    (urllib3.exceptions.InvalidHeader("bad header"), False, None),
    (ValueError("Invalid header value b'Bearer k\\n'"), False, None),
]


@pytest.mark.parametrize(("failure", "retried", "counted"), CONDITIONS)
def test_transport_failures_by_the_same_policy(failure, retried, counted):
    sorted_failure = _failure(failure, "POST /x")
    assert sorted_failure is not None
    raised, as_counted = sorted_failure
    assert isinstance(raised, RetryableFailure) is retried
    if not retried:
        assert isinstance(raised, DeliveryError)
        assert "Bearer" not in str(raised)
    assert as_counted == counted


def test_a_refused_connection_for_real_is_retried():
    raised, counted = _failure(_refused(), "GET /") or (None, None)
    assert isinstance(raised, RetryableFailure)
    assert counted == "connection error"
