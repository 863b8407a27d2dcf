"""Delivered means acknowledged: a 2xx that is not the platform's own answer is no delivery.

A captive portal, a proxy or an API gateway in front of a platform can answer 200 with a
page of its own, or a redirect to a login page; a server can trickle its answer. Each
must end as a retry and, when it goes on, in exit 4 naming what came back, with no STATE
past the usage it did not take.
"""

from __future__ import annotations

import pytest

from tests.conftest import DESTINATIONS_UNDER_TEST, config_for, run_target, singer, usage

LABELS = {
    "m3ter": "m3ter",
    "metronome": "Metronome",
    "orb": "Orb",
    "lago": "Lago",
    "openmeter": "OpenMeter",
    "stripe": "Stripe",
}
# what the error line quotes of each middlebox answer
QUOTED = {"html-200": "text/html", "errors-200": "upstream connect error"}


def fifty_rows() -> list[str]:
    return singer("usage", usage(50), state={"bookmark": 50})


@pytest.mark.parametrize("kind", ["html-200", "errors-200"])
@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_a_middlebox_answering_200_is_not_a_delivery(sandbox, tmp_path, destination, kind):
    sandbox.faults({"kind": kind, "every": 1, "destination": destination})
    config = config_for(destination, sandbox, max_retry_seconds=2, batch_size_rows=25)

    result = run_target(tmp_path, config, fifty_rows())

    assert result.returncode == 4, result.stderr
    assert result.states == []  # nothing covers usage no platform acknowledged
    assert sandbox.stats(destination)["stored"] == 0
    (line,) = result.error_lines
    assert f"not {LABELS[destination]}'s acknowledgement" in line
    assert QUOTED[kind] in line
    assert "proxy" in line and "HTTPS_PROXY" in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_a_middlebox_answer_once_is_retried_and_everything_lands(sandbox, tmp_path, destination):
    sandbox.faults({"kind": "html-200", "count": 1, "destination": destination})
    config = config_for(destination, sandbox, max_retry_seconds=30)

    result = run_target(tmp_path, config, fifty_rows())

    assert result.returncode == 0, result.stderr
    assert result.states == [{"bookmark": 50}]
    stats = sandbox.stats(destination)
    assert stats["stored"] == 50
    assert stats["requests"] >= 2  # the portal's page, then the platform's answer
    assert "not" in result.stderr and "acknowledgement" in result.stderr  # the retry is said


@pytest.mark.parametrize("destination", ["m3ter", "openmeter"])
def test_a_redirect_stops_at_once_naming_its_location(sandbox, tmp_path, destination):
    sandbox.faults({"kind": "redirect", "every": 1, "destination": destination})
    config = config_for(destination, sandbox, max_retry_seconds=60)

    result = run_target(tmp_path, config, fifty_rows())

    assert result.returncode == 4, result.stderr
    assert result.states == []
    (line,) = result.error_lines
    assert "302" in line and "https://portal.example.net/login" in line
    assert sandbox.stats(destination)["requests"] == 1  # a redirect is not retried


@pytest.mark.parametrize("destination", ["m3ter", "orb", "lago", "stripe"])
def test_a_trickled_answer_is_cut_off_by_the_request_timeout_and_retried(sandbox, tmp_path, destination):
    # the acknowledgement's body one byte every 0.7 s (Stripe's is 2 bytes) takes longer than the 1 s timeout,
    # although no single read waits that long
    sandbox.faults({"kind": "trickle", "count": 1, "delay_ms": 700, "destination": destination})
    config = config_for(destination, sandbox, request_timeout_seconds=1, max_retry_seconds=30)

    result = run_target(tmp_path, config, fifty_rows())

    assert result.returncode == 0, result.stderr
    assert "timed out" in result.stderr
    assert result.states == [{"bookmark": 50}]
    assert sandbox.stats(destination)["stored"] == 50  # the re-send was de-duplicated


def test_an_answer_trickled_forever_ends_in_exit_4(sandbox, tmp_path):
    sandbox.faults({"kind": "trickle", "every": 1, "delay_ms": 400, "destination": "m3ter"})
    config = config_for("m3ter", sandbox, request_timeout_seconds=1, max_retry_seconds=3)

    result = run_target(tmp_path, config, fifty_rows())

    assert result.returncode == 4, result.stderr
    assert result.states == []
    (line,) = result.error_lines
    assert "timed out" in line and "retry budget" in line
