"""Delivered means acknowledged: a 2xx that is not the platform's own answer is no delivery.

A captive portal, a proxy or an API gateway in front of a platform can answer 200 with a
page of its own, or a redirect to a login page; a server can trickle its answer. Each
must end as a retry and, when it goes on, in exit 4 naming what came back, with no STATE
past the usage it did not take.
"""

from __future__ import annotations

import pytest

from tests.helpers import dead_letters, run_target, singer, usage
from tests.platforms import CASES, DESTINATIONS_UNDER_TEST, config_for

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
    assert f"not {CASES[destination].label}'s acknowledgement" in line
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


# --- what platforms validate only after acknowledging is checked before sending ---------


def mixed_rows(bad: dict) -> list[str]:
    """20 usage rows; rows 3 and 11 (input lines 5 and 13) changed by ``bad``."""
    rows = usage(20)
    for index in (3, 11):
        rows[index].update(bad)
    return singer("usage", rows, state={"bookmark": 20})


@pytest.mark.parametrize(
    ("destination", "bad", "reason"),
    [
        # Stripe accepts a meter event whose value is not a number, then drops it
        ("stripe", {"tokens": "lots"}, "payload.value: 'lots' is not a number"),
        # Metronome: property values over 256 bytes
        ("metronome", {"note": "x" * 300}, "properties.note: value of 300 bytes"),
        # m3ter: a measure must be a number
        ("m3ter", {"tokens": "lots"}, "measure.tokens"),
    ],
)
def test_what_the_platform_would_drop_later_is_dead_lettered_not_sent(
    sandbox, tmp_path, destination, bad, reason
):
    config = config_for(destination, sandbox, max_rejected_ratio=1)

    result = run_target(tmp_path, config, mixed_rows(bad))

    assert result.returncode == 0, result.stderr
    assert result.states == [{"bookmark": 20}]
    assert sandbox.stats(destination)["stored"] == 18
    letters = dead_letters(tmp_path)
    assert [letter["line"] for letter in letters] == [5, 13]  # SCHEMA is line 1
    for letter in letters:
        assert letter["stage"] in ("validation", "mapping")
        assert reason in letter["reason"]


# A gateway's own JSON "success": only platforms whose answer has a shape can tell it apart
# (Metronome's SDK casts its answer to None, Stripe's stream answers an empty object).
STRAY_JSON_OK = {
    "m3ter": False,
    "metronome": True,
    "orb": False,
    "lago": False,
    "openmeter": False,
    "stripe": True,
}


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_a_gateways_own_json_ok_is_no_acknowledgement_where_the_answer_has_a_shape(sandbox, destination):
    from target_usage_billing.destinations import DESTINATIONS
    from target_usage_billing.destinations.base import Verdict
    from target_usage_billing.http import HttpTransport, Response

    platform = DESTINATIONS[destination](config_for(destination, sandbox), HttpTransport())
    status = platform.acknowledgement.statuses[0]
    ruling = platform.judge(Response(status, {"content-type": "application/json"}, b'{"status": "ok"}'))
    if STRAY_JSON_OK[destination]:
        assert ruling.verdict is Verdict.ACCEPTED
    else:
        assert ruling.verdict is Verdict.RETRY, ruling
        assert f"not {CASES[destination].label}'s acknowledgement" in ruling.message


@pytest.mark.parametrize(
    ("destination", "bad", "overrides", "reason"),
    [
        # OpenMeter validates a CloudEvent after taking it: an empty subject is refused here
        ("openmeter", {"account": ""}, {}, "subject"),
        ("openmeter", {"account": None}, {}, "subject"),
        # every one of the meter's value keys, not only the first
        (
            "stripe",
            {"cost": "a lot"},
            {
                "stripe_value_keys": ["value", "cost"],
                "mappings": [
                    {
                        "stream": "usage",
                        "fields": {
                            "event_name": "'tokens'",
                            "timestamp": "at",
                            "payload": {"stripe_customer_id": "account", "value": "tokens", "cost": "cost"},
                        },
                    }
                ],
            },
            "payload.cost: 'a lot' is not a number",
        ),
    ],
)
def test_fields_checked_later_by_openmeter_and_stripe_are_checked_before_sending(
    sandbox, tmp_path, destination, bad, overrides, reason
):
    config = config_for(destination, sandbox, max_rejected_ratio=1, **overrides)
    rows = usage(20)
    for row in rows:
        row.setdefault("cost", "1.5")
    for index in (3, 11):
        rows[index].update(bad)

    result = run_target(tmp_path, config, singer("usage", rows, state={"bookmark": 20}))

    assert result.returncode == 0, result.stderr
    assert result.states == [{"bookmark": 20}]
    assert sandbox.stats(destination)["stored"] == 18, result.stderr
    letters = dead_letters(tmp_path)
    assert [letter["line"] for letter in letters] == [5, 13]
    for letter in letters:
        assert reason in letter["reason"], letter["reason"]
