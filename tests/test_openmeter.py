"""OpenMeter: the destination against the sandbox, and OpenMeter's official SDK
(openmeter) as the referee of both (the families shared with the other platforms run
it too: see CASES in
tests/platforms.py)."""

from __future__ import annotations

import datetime as dt
import typing as t

import pytest
from corehttp.exceptions import ClientAuthenticationError, HttpResponseError
from openmeter import Client as OpenMeterClient
from openmeter.models import Event as CloudEvent

from tests.helpers import dead_letters, run_target, singer, usage
from tests.platforms import CASES, OPENMETER_TOKEN, config_for, load_segment_tracks
from tests.referees import body_items, referee_bodies


def cloud_event(key: str, **fields: t.Any) -> dict:
    moment = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    return {
        "specversion": "1.0",
        "id": key,
        "source": "tests",
        "type": "tokens",
        "subject": "customer-1",
        "time": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": {"tokens": 5},
        **fields,
    }


OPENMETER = CASES["openmeter"]


# --- the target ----------------------------------------------------------------------


def test_segment_events_arrive_once_as_cloudevents(sandbox, tmp_path):
    result, pairs = load_segment_tracks(
        sandbox, tmp_path, "openmeter", CASES["openmeter"].config(sandbox), seed=6
    )
    for record, item in pairs:
        assert item["specversion"] == "1.0" and item["source"] == "target-usage-billing"
        assert item["type"] == record["event"]
        assert item["subject"] == record["context"]["groupId"]
        assert item["data"] == record["properties"]
        assert item["time"].endswith("Z")
    assert result.states[-1] is not None


def test_the_source_is_a_setting_and_part_of_the_identity(sandbox, tmp_path):
    rows = usage(3)
    for source in ("billing-a", "billing-b"):
        result = run_target(
            tmp_path, config_for("openmeter", sandbox, openmeter_source=source), singer("usage", rows)
        )
        assert result.returncode == 0, result.stderr
    stored = sandbox.items("openmeter")
    assert sorted((item["source"], item["id"]) for item in stored) == sorted(
        (source, item_id)
        for source in ("billing-a", "billing-b")
        for item_id in {item["id"] for item in stored}
    )
    assert len(stored) == 6


def test_a_self_hosted_openmeter_needs_no_token(tmp_path):
    from tests.helpers import start_sandbox, stop_sandbox

    sandbox = start_sandbox(tmp_path / "sandbox", "--openmeter-api-token", "")
    try:
        config = config_for("openmeter", sandbox)
        config.pop("openmeter_api_token")
        result = run_target(tmp_path, config, singer("usage", usage(4)))
        assert result.returncode == 0, result.stderr
        assert sandbox.stats("openmeter")["stored"] == 4
    finally:
        stop_sandbox(sandbox)


def test_an_event_openmeter_refuses_is_isolated_and_dead_lettered(sandbox, tmp_path):
    sandbox.faults(refuse_items_containing=["REFUSE"])
    rows = usage(6)
    rows[2]["note"] = "REFUSE"
    result = run_target(
        tmp_path, config_for("openmeter", sandbox, max_rejected_ratio=1), singer("usage", rows)
    )
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("openmeter")["stored"] == 5
    (dead,) = dead_letters(tmp_path)
    assert dead["stage"] == "api" and dead["record"]["id"] == 2


# --- the sandbox's contract ------------------------------------------------------------


def test_the_sandbox_dedupes_by_id_and_source(sandbox):
    assert OPENMETER.post_items(sandbox, [cloud_event("a"), cloud_event("b")]).status_code == 204
    assert (
        OPENMETER.post_items(sandbox, [cloud_event("a"), cloud_event("a", source="other")]).status_code == 204
    )
    assert sandbox.stats("openmeter")["stored"] == 3
    assert sandbox.stats("openmeter")["duplicates"] == 1


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"specversion": "0.3"}, "specversion"),
        ({"subject": ""}, "subject is required"),
        ({"time": "yesterday"}, "RFC 3339"),
        ({"data": [1]}, "data must be a JSON object"),
        ({"Bad-Name": 1}, "not CloudEvents attribute names"),
    ],
)
def test_the_sandbox_refuses_a_malformed_event_and_the_whole_request(sandbox, change, detail):
    answer = OPENMETER.post_items(sandbox, [cloud_event("ok"), {**cloud_event("bad"), **change}])
    assert answer.status_code == 400
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert detail in answer.json()["detail"] and "event [1]" in answer.json()["detail"]
    assert sandbox.stats("openmeter")["stored"] == 0


def test_the_sandbox_wants_the_batch_content_type_and_a_token(sandbox):
    assert (
        OPENMETER.post_items(sandbox, [cloud_event("a")], content_type="application/json").status_code == 400
    )
    assert OPENMETER.post_items(sandbox, [cloud_event("a")], key="wrong").status_code == 401


# --- the official SDK as referee ---------------------------------------------------------


def test_every_body_fits_the_sdk_model(tmp_path):
    for bodies in referee_bodies(tmp_path, "openmeter", seed=11, hours=48):
        events = body_items(OPENMETER, bodies)
        assert events
        known = {name for name in t.get_type_hints(CloudEvent) if not name.startswith("_")}  # its fields
        for item in events:
            assert set(item) <= known, set(item) - known
            model = CloudEvent(item)  # the SDK reads it back field for field
            assert (model.id, model.source, model.specversion, model.type, model.subject) == (
                item["id"],
                item["source"],
                "1.0",
                item["type"],
                item["subject"],
            )
            assert model.time == dt.datetime.fromisoformat(item["time"].replace("Z", "+00:00"))


def openmeter_client(sandbox, token: str = OPENMETER_TOKEN) -> OpenMeterClient:
    return OpenMeterClient(endpoint=f"{sandbox.url}/openmeter", token=token, retry_total=0)


def sdk_event(key: str) -> CloudEvent:
    return CloudEvent(
        id=key,
        source="sdk",
        specversion="1.0",
        type="tokens",
        subject="customer-1",
        time=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1),
        data={"tokens": 1},
    )


def test_the_openmeter_sdk_ingests_through_the_sandbox(sandbox):
    openmeter_client(sandbox).events.ingest_events([sdk_event("s1"), sdk_event("s2")])
    assert sandbox.stats("openmeter")["stored"] == 2


def test_the_openmeter_sdk_gets_the_errors_it_expects(sandbox):
    with pytest.raises(ClientAuthenticationError):
        openmeter_client(sandbox, token="wrong").events.ingest_events([sdk_event("x")])
    sandbox.faults({"kind": "503", "count": 1, "destination": "openmeter"})
    with pytest.raises(HttpResponseError) as caught:
        openmeter_client(sandbox).events.ingest_events([sdk_event("y")])
    assert caught.value.status_code == 503
