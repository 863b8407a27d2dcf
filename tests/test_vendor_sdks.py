"""The vendors' official Python SDKs as referees of the wire contracts.

No test can reach the live APIs, and the sandbox was written from our reading of the
docs. Here m3ter's and Metronome's own SDKs (generated from the vendors' OpenAPI specs)
judge both sides: every body the target writes must fit the SDK's request types, and the
official clients, pointed at the sandbox, must get what they get from the real API.
"""

from __future__ import annotations

import datetime as dt
import json
import typing as t
from pathlib import Path

import m3ter
import metronome
import pytest
from m3ter.types.measurement_request_param import MeasurementRequestParam
from metronome.types.v1.usage_ingest_params import Usage

from target_usage_billing.sandbox.samples import singer_lines
from tests.helpers import EXAMPLES, run_target, stamp
from tests.platforms import M3TER_KEY, M3TER_SECRET, METRONOME_TOKEN, m3ter_config, metronome_config
from tests.referees import problems

ALL_M3TER_FIELDS = {
    "stream": "segment_events",
    "preset": "segment",
    "fields": {
        "meter": "event",
        "ets": "sentAt",
        "who": {"user": "userId"},
        "what": {"endpoint": "properties.endpoint"},
        "where": {"region": "properties.region"},
        "other": {"anonymous": "anonymousId"},
        "metadata": {"ip": "context.ip"},
        "measure": {"requests": "properties.requests", "tokens": "properties.tokens"},
        "cost": {"usd": "properties.cost_usd"},
        "income": {"seconds": "properties.compute_seconds"},
    },
}


def dry_run_items(tmp_path: Path, config: dict, lines: Path | list[str]) -> list[t.Any]:
    config = {**config, "dry_run": True, "max_rejected_ratio": 1}
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 0, result.stderr
    requests_ = [json.loads(line) for line in (tmp_path / "dry-run-requests.jsonl").read_text().splitlines()]
    assert requests_
    bodies = [r["body"] for r in requests_]
    if config["destination"] == "m3ter":
        assert all(set(body) == {"measurements"} for body in bodies)  # the envelope
        return [item for body in bodies for item in body["measurements"]]
    assert all(isinstance(body, list) for body in bodies)  # Metronome: a bare array
    return [item for body in bodies for item in body]


def mixed_input(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.singer.jsonl"
    path.write_text("\n".join(singer_lines(3000, seed=5, hours=48, state_every=500)) + "\n")
    return path


@pytest.mark.parametrize("source", ["example", "mixed"])
def test_every_m3ter_body_fits_the_sdk_request_type(sandbox, tmp_path, source):
    if source == "example":
        config, lines = m3ter_config(sandbox), EXAMPLES / "segment-events.singer.jsonl"
    else:
        config, lines = m3ter_config(sandbox, mappings=[ALL_M3TER_FIELDS]), mixed_input(tmp_path)
    items = dry_run_items(tmp_path, config, lines)
    found = [
        p
        for i, item in enumerate(items)
        for p in problems(item, MeasurementRequestParam, f"measurements[{i}]")
    ]
    assert found == []
    if source == "mixed":  # every field of the request type was exercised
        assert set().union(*(item.keys() for item in items)) == set(MeasurementRequestParam.__annotations__)


@pytest.mark.parametrize("source", ["example", "mixed"])
def test_every_metronome_body_fits_the_sdk_request_type(sandbox, tmp_path, source):
    config = metronome_config(sandbox)
    if source == "example":
        lines: Path | list[str] = mixed_input(tmp_path)  # the bundled example is older than 34 days
        lines = [line for line in lines.read_text().splitlines()][:400]
    else:
        lines = mixed_input(tmp_path)
    for as_strings in (True, False):
        config["metronome_numbers_as_strings"] = as_strings
        items = dry_run_items(tmp_path, config, lines)
        found = [p for i, item in enumerate(items) for p in problems(item, Usage, f"usage[{i}]")]
        assert found == []
        (tmp_path / "dry-run-requests.jsonl").unlink()


def test_the_referee_itself_catches_contract_breaks():
    bad = {"meter": "m", "ts": "2026-11-20T10:00:00Z", "measure": {"n": "1"}, "colour": "red"}
    found = problems(bad, MeasurementRequestParam, "m")
    assert "m.account: missing (required)" in found
    assert "m.colour: not a field of MeasurementRequestParam" in found
    assert any(p.startswith("m.measure.n: expected a number") for p in found)


# --- the official clients against the sandbox ------------------------------------------


def m3ter_client(sandbox, **options: t.Any) -> m3ter.M3ter:
    options.setdefault("api_key", M3TER_KEY)
    options.setdefault("api_secret", M3TER_SECRET)
    return m3ter.M3ter(org_id="sdk-org", base_url=sandbox.url, **options)


def measurement(i: int, ts: t.Any = None) -> dict:
    moment = ts if ts is not None else dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    return {"uid": f"sdk-{i}", "meter": "m", "account": "a", "ts": moment, "measure": {"n": i}}


def test_the_m3ter_sdk_authenticates_and_ingests_through_the_sandbox(sandbox):
    client = m3ter_client(sandbox)
    # a datetime: the SDK sends it as "+00:00", which the API takes as ISO 8601
    answer = client.usage.submit(measurements=[measurement(1), measurement(2, "2026-11-20T10:00:00Z")])
    assert answer.result == "accepted"
    assert sandbox.stats("m3ter")["stored"] == 2
    assert sandbox.stats("m3ter")["token_requests"] >= 1


def test_the_m3ter_sdk_gets_the_error_classes_it_expects(sandbox):
    with pytest.raises(m3ter.AuthenticationError):
        m3ter_client(sandbox, api_secret="wrong", max_retries=0).usage.submit(measurements=[measurement(1)])
    client = m3ter_client(sandbox, max_retries=0)
    with pytest.raises(m3ter.BadRequestError):  # over 1,000 measurements in one request
        client.usage.submit(measurements=[measurement(i) for i in range(1001)])
    sandbox.faults({"kind": "429", "count": 1, "retry_after": "1"})
    with pytest.raises(m3ter.RateLimitError):
        client.usage.submit(measurements=[measurement(1)])
    sandbox.faults({"kind": "503", "count": 1})
    with pytest.raises(m3ter.InternalServerError):
        client.usage.submit(measurements=[measurement(1)])
    sandbox.faults({"kind": "503", "count": 1})
    assert (
        m3ter_client(sandbox, max_retries=2).usage.submit(measurements=[measurement(7)]).result == "accepted"
    )


def metronome_client(sandbox, **options: t.Any) -> metronome.Metronome:
    options.setdefault("bearer_token", METRONOME_TOKEN)
    return metronome.Metronome(base_url=sandbox.url, **options)


def usage_event(i: int) -> dict:
    return {"transaction_id": f"sdk-{i}", "customer_id": "c", "event_type": "e", "timestamp": stamp(3600)}


def test_the_metronome_sdk_authenticates_lists_customers_and_ingests_through_the_sandbox(sandbox):
    client = metronome_client(sandbox)
    assert list(client.v1.customers.list()) == []
    client.v1.usage.ingest(usage=[usage_event(1), {**usage_event(2), "properties": {"n": "1.5"}}])
    assert sandbox.stats("metronome")["stored"] == 2


def test_the_metronome_sdk_gets_the_error_classes_it_expects(sandbox):
    with pytest.raises(metronome.PermissionDeniedError):  # Metronome answers a bad token with 403
        metronome_client(sandbox, bearer_token="wrong", max_retries=0).v1.usage.ingest(usage=[usage_event(1)])
    client = metronome_client(sandbox, max_retries=0)
    with pytest.raises(metronome.BadRequestError):  # over 100 events in one request
        client.v1.usage.ingest(usage=[usage_event(i) for i in range(101)])
    sandbox.faults({"kind": "429", "count": 1, "retry_after": "1"})
    with pytest.raises(metronome.RateLimitError):
        client.v1.usage.ingest(usage=[usage_event(1)])
    sandbox.faults({"kind": "500", "count": 1})
    with pytest.raises(metronome.InternalServerError):
        client.v1.usage.ingest(usage=[usage_event(1)])
