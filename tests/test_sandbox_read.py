"""The sandbox's read side, judged by the vendors' official SDKs (contract tests).

Items go in through the sandbox (the SDKs' own ingest calls, and the target's CLI), are
read back with each platform's official client pointed at the sandbox, and must come
back parsed into the SDK's own types with the right ids, counts and exact sums. With the
faults ``lost-after-ack`` and ``invalid-after-ack``, exactly the predicted items must be
missing, or reported invalid through the platform's own error channel.
"""

from __future__ import annotations

import datetime as dt
import decimal

import m3ter
import metronome
import orb
import pytest
import requests
import stripe
from lago_python_client.client import Client as LagoClient
from lago_python_client.exceptions import LagoApiError
from lago_python_client.models.event import BatchEvent
from lago_python_client.models.event import Event as LagoEvent
from m3ter.types import UsageQueryResponse
from metronome.types.v1.usage_search_response import UsageSearchResponseItem
from openmeter import Client as OpenMeterClient
from openmeter.models import Event as CloudEvent
from openmeter.models import IngestedEvent
from stripe.events import V1BillingMeterErrorReportTriggeredEvent

from tests.helpers import run_target, singer, start_sandbox, stop_sandbox, usage
from tests.platforms import (
    CASES,
    DESTINATIONS_UNDER_TEST,
    LAGO_KEY,
    M3TER_KEY,
    M3TER_SECRET,
    METRONOME_TOKEN,
    OPENMETER_TOKEN,
    ORB_KEY,
    STRIPE_KEY,
    config_for,
)

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC).replace(microsecond=0)
# two whole UTC hours in the past, inside every platform's window (Orb's 12-hour grace)
HOUR_A = NOW.replace(minute=0, second=0) - dt.timedelta(hours=3)
HOUR_B = HOUR_A + dt.timedelta(hours=1)


def z(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- m3ter ------------------------------------------------------------------------------


def m3ter_client(sandbox) -> m3ter.M3ter:
    return m3ter.M3ter(org_id="org-read", api_key=M3TER_KEY, api_secret=M3TER_SECRET, base_url=sandbox.url)


# sums whose float addition is not exact: acme in HOUR_A 0.1 + 0.2, in HOUR_B 0.7 + 0.4
M3TER_VALUES = [0.1, 0.7, 1.1, 2.2, 0.2, 0.4, 3.3, 0.5, 0.9, 1.0]


def m3ter_measurements() -> list[dict]:
    """m0..m9: meter "api" (m0..m7) and "storage" (m8, m9), accounts acme (i % 4 < 2) and
    globex, in HOUR_A (even i) and HOUR_B (odd i)."""
    return [
        {
            "uid": f"m{i}",
            "meter": "api" if i < 8 else "storage",
            "account": "acme" if i % 4 < 2 else "globex",
            "ts": z((HOUR_A if i % 2 == 0 else HOUR_B) + dt.timedelta(minutes=i)),
            "measure": {"requests": M3TER_VALUES[i]},
            "what": {"region": "eu" if i < 4 else "us"},
        }
        for i in range(10)
    ]


def expected_m3ter_sums(skip: set[str]) -> dict[tuple[str, str], decimal.Decimal]:
    sums: dict[tuple[str, str], decimal.Decimal] = {}
    for m in m3ter_measurements():
        if m["meter"] == "api" and m["uid"] not in skip:
            hour = "A" if m["ts"] < z(HOUR_B) else "B"
            key = (m["account"], hour)
            sums[key] = sums.get(key, decimal.Decimal(0)) + decimal.Decimal(str(m["measure"]["requests"]))
    return sums


def m3ter_totals(client: m3ter.M3ter, *, frequency: str = "HOUR") -> UsageQueryResponse:
    meter_id = client.meters.list(codes=["api"]).data[0].id
    return client.usage.query(
        start_date=z(HOUR_A),
        end_date=z(HOUR_B + dt.timedelta(hours=1)),
        meter_ids=[meter_id],
        aggregations=[
            {"meter_id": meter_id, "field_code": "requests", "field_type": "MEASURE", "function": "SUM"}
        ],
        groups=[{"group_type": "ACCOUNT"}, {"group_type": "TIME", "frequency": frequency}],  # type: ignore[typeddict-unknown-key]
    )


def sums_of(answer: UsageQueryResponse) -> dict[tuple[str, str], decimal.Decimal]:
    found = {}
    for row in answer.data or []:
        hour = "A" if row["startDate"] == z(HOUR_A) else "B"
        found[(row["accountCode"], hour)] = decimal.Decimal(str(row["value"]))
    return found


def test_m3ter_meters_accounts_and_usage_totals_read_back_with_the_sdk(sandbox):
    client = m3ter_client(sandbox)
    assert client.usage.submit(measurements=m3ter_measurements()).result == "accepted"
    meters = {meter.code: meter.id for meter in client.meters.list()}
    assert set(meters) == {"api", "storage"}
    accounts = client.accounts.list(codes=["acme"]).data
    assert [account.code for account in accounts] == ["acme"]
    answer = m3ter_totals(client)
    assert isinstance(answer, UsageQueryResponse) and answer.has_more_data is False
    # exact decimals: float addition gives 0.30000000000000004 and 1.0999999999999999
    assert sums_of(answer) == expected_m3ter_sums(set())
    assert sums_of(answer)[("acme", "A")] == decimal.Decimal("0.3")
    assert sums_of(answer)[("acme", "B")] == decimal.Decimal("1.1")
    assert all(row["meterId"] == meters["api"] and row["function"] == "SUM" for row in answer.data or [])
    # filtered by account and by a dimension, without aggregation: the measurements themselves
    raw = client.usage.query(
        start_date=z(HOUR_A),
        end_date=z(NOW),
        account_ids=[accounts[0].id],
        dimension_filters=[{"meter_id": meters["api"], "field_code": "region", "values": ["eu"]}],
    )
    # the filter on meter "api" leaves the other meter's measurements as they are
    assert sorted(row["uid"] for row in raw.data or []) == ["m0", "m1", "m8", "m9"]
    with pytest.raises(m3ter.BadRequestError):  # the time period is required
        client.usage.query(meter_ids=[meters["api"]])


def test_m3ter_lost_and_invalid_after_ack_are_missing_from_totals_and_listed_as_failure_events(sandbox):
    sandbox.faults(
        {"kind": "lost-after-ack", "every": 4, "destination": "m3ter"},
        {"kind": "invalid-after-ack", "every": 3, "destination": "m3ter"},
    )
    client = m3ter_client(sandbox)
    measurements = m3ter_measurements()
    assert client.usage.submit(measurements=measurements[:5]).result == "accepted"
    assert client.usage.submit(measurements=measurements[5:]).result == "accepted"  # counting goes on
    lost, invalid = {"m3", "m7"}, {"m2", "m5", "m8"}  # the 4th and 8th; the 3rd, 6th and 9th
    stats = sandbox.stats("m3ter")
    assert (stats["lost_ids"], stats["lost_after_ack"]) == (["m3", "m7"], 2)
    assert (stats["invalid_ids"], stats["invalid_after_ack"]) == (["m2", "m5", "m8"], 3)
    assert {item["uid"] for item in sandbox.items("m3ter")} == {f"m{i}" for i in range(10)} - lost
    assert sums_of(m3ter_totals(client)) == expected_m3ter_sums(lost | invalid)
    events = list(client.events.list(event_name="ingest.validation.failure"))
    assert sorted(event.m3ter_event["eventData"]["uid"] for event in events) == sorted(invalid)  # type: ignore[index]
    assert {event.event_name for event in events} == {"ingest.validation.failure"}
    assert all(isinstance(event.event_time, dt.datetime) for event in events)
    assert list(client.events.list(event_name="configuration.commitment.created")) == []
    # a re-send of a lost measurement is a new one: it is counted (the 11th: not hit)
    client.usage.submit(measurements=[measurements[3]])
    assert "m3" in {item["uid"] for item in sandbox.items("m3ter")}


def test_m3ter_reads_need_a_valid_token(sandbox):
    answer = requests.get(
        f"{sandbox.url}/organizations/o/events", headers={"Authorization": "Bearer nope"}, timeout=10
    )
    assert answer.status_code == 403


# --- Metronome ----------------------------------------------------------------------------


def test_metronome_event_search_reads_back_with_the_sdk_and_invalid_events_match_no_customer(sandbox):
    sandbox.faults({"kind": "invalid-after-ack", "every": 2, "destination": "metronome"})
    client = metronome.Metronome(bearer_token=METRONOME_TOKEN, base_url=sandbox.url)
    events = [
        {
            "transaction_id": f"t{i}",
            "customer_id": "acme",
            "event_type": "tokens",
            "timestamp": z(HOUR_A + dt.timedelta(minutes=i)),
            "properties": {"tokens": f"{i}.5"},
        }
        for i in range(5)
    ]
    client.v1.usage.ingest(usage=events)
    found = client.v1.usage.search(transaction_ids=["absent", *(e["transaction_id"] for e in events)])
    assert all(isinstance(item, UsageSearchResponseItem) for item in found)
    assert [item.transaction_id for item in found] == ["t0", "t1", "t2", "t3", "t4"]  # absent ids: not listed
    assert [item.timestamp for item in found] == [HOUR_A + dt.timedelta(minutes=i) for i in range(5)]
    assert [item.properties for item in found] == [{"tokens": f"{i}.5"} for i in range(5)]
    unmatched = [item.transaction_id for item in found if item.matched_customer is None]
    assert unmatched == ["t1", "t3"] == sandbox.stats("metronome")["invalid_ids"]
    for item in found:
        if item.matched_customer is not None:
            assert item.matched_customer.name == "acme" and item.matched_customer.id
            assert [metric.name for metric in item.matched_billable_metrics or []] == ["tokens"]
        else:
            assert item.matched_billable_metrics == []
    with pytest.raises(metronome.BadRequestError):  # at most 100 ids a search
        client.v1.usage.search(transaction_ids=[f"t{i}" for i in range(101)])
    with pytest.raises(metronome.PermissionDeniedError):
        metronome.Metronome(bearer_token="wrong", base_url=sandbox.url, max_retries=0).v1.usage.search(
            transaction_ids=["t0"]
        )


# --- Orb ------------------------------------------------------------------------------------


def test_orb_event_search_and_hourly_volume_read_back_with_the_sdk(sandbox):
    sandbox.faults({"kind": "lost-after-ack", "every": 3, "destination": "orb"})
    client = orb.Orb(api_key=ORB_KEY, base_url=f"{sandbox.url}/orb/v1")
    events = [
        {
            "idempotency_key": f"o{i}",
            "event_name": "tokens",
            "timestamp": z((HOUR_A if i < 4 else HOUR_B) + dt.timedelta(minutes=i)),
            "external_customer_id": "acme",
            "properties": {"tokens": i},
        }
        for i in range(7)
    ]
    assert client.events.ingest(events=events).validation_failed == []  # acknowledged, all of them
    lost = ["o2", "o5"]
    assert sandbox.stats("orb")["lost_ids"] == lost
    found = client.events.search(event_ids=[e["idempotency_key"] for e in events])
    assert [event.id for event in found.data] == ["o0", "o1", "o3", "o4", "o6"]
    first = found.data[0]
    assert (first.event_name, first.external_customer_id, first.properties) == (
        "tokens",
        "acme",
        {"tokens": 0},
    )
    assert first.timestamp == HOUR_A and first.deprecated is False
    volume = client.events.volume.list(timeframe_start=HOUR_A - dt.timedelta(hours=1))
    assert [(v.timeframe_start, v.timeframe_end, v.count) for v in volume.data] == [
        (HOUR_A, HOUR_B, 3),  # o0, o1, o3
        (HOUR_B, HOUR_B + dt.timedelta(hours=1), 2),  # o4, o6
    ]
    outside = client.events.search(event_ids=["o0"], timeframe_start=HOUR_B, timeframe_end=NOW)
    assert outside.data == []


def test_orb_and_lago_refuse_invalid_after_ack_they_validate_in_the_request(sandbox):
    for destination in ("orb", "lago"):
        answer = requests.post(
            f"{sandbox.url}/_sandbox/faults",
            json={"faults": [{"kind": "invalid-after-ack", "every": 2, "destination": destination}]},
            timeout=10,
        )
        assert answer.status_code == 400
        assert "validates in the request" in answer.json()["message"]


# --- Lago -----------------------------------------------------------------------------------


def test_lago_finds_stored_events_with_the_sdk_and_answers_404_for_lost_ones(sandbox):
    sandbox.faults({"kind": "lost-after-ack", "every": 2, "destination": "lago"})
    client = LagoClient(api_key=LAGO_KEY, api_url=f"{sandbox.url}/lago/")
    stamp = int(HOUR_A.timestamp())
    events = [
        LagoEvent(
            transaction_id=f"l{i}",
            external_subscription_id="sub-1",
            code="tokens",
            timestamp=stamp + i,
            properties={"tokens": "2.50"},
        )
        for i in range(4)
    ]
    client.events.batch_create(BatchEvent(events=events))
    assert sandbox.stats("lago")["lost_ids"] == ["l1", "l3"]
    found = client.events.find("l2")
    assert (found.transaction_id, found.code, found.external_subscription_id) == ("l2", "tokens", "sub-1")
    assert found.properties == {"tokens": "2.50"}
    assert dt.datetime.fromisoformat(found.timestamp.replace("Z", "+00:00")).timestamp() == stamp + 2
    with pytest.raises(LagoApiError) as caught:
        client.events.find("l3")
    assert caught.value.status_code == 404
    assert caught.value.response["code"] == "event_not_found"
    with pytest.raises(LagoApiError) as caught:
        LagoClient(api_key="wrong", api_url=f"{sandbox.url}/lago/").events.find("l2")
    assert caught.value.status_code == 401


# --- OpenMeter ------------------------------------------------------------------------------


def test_openmeter_lists_ingested_events_with_the_sdk_with_validation_errors(sandbox):
    sandbox.faults(
        {"kind": "lost-after-ack", "every": 5, "destination": "openmeter"},
        {"kind": "invalid-after-ack", "every": 2, "destination": "openmeter"},
    )
    client = OpenMeterClient(endpoint=f"{sandbox.url}/openmeter", token=OPENMETER_TOKEN, retry_total=0)
    client.events.ingest_events(
        [
            CloudEvent(
                id=f"e{i}",
                source="sdk",
                specversion="1.0",
                type="tokens",
                subject="customer-1",
                time=HOUR_A + dt.timedelta(minutes=i),
                data={"tokens": i},
            )
            for i in range(6)
        ]
    )
    stats = sandbox.stats("openmeter")
    assert (stats["lost_ids"], stats["invalid_ids"]) == (["e4"], ["e1", "e3", "e5"])
    listed = client.events.list()  # the last 72 hours, newest first
    assert all(isinstance(entry, IngestedEvent) for entry in listed)
    assert [entry.event.id for entry in listed] == ["e5", "e3", "e2", "e1", "e0"]
    invalid = [entry.event.id for entry in listed if entry.validation_error]
    assert invalid == ["e5", "e3", "e1"]
    assert all(isinstance(entry.ingested_at, dt.datetime) for entry in listed)
    assert listed[-1].event.time == HOUR_A and listed[-1].event.data == {"tokens": 0}
    assert [entry.event.id for entry in client.events.list(id="e2")] == ["e2"]
    later = client.events.list(from_parameter=HOUR_A + dt.timedelta(minutes=3))
    assert [entry.event.id for entry in later] == ["e5", "e3"]
    assert client.events.list(from_parameter=NOW) == []


# --- Stripe ---------------------------------------------------------------------------------


def stripe_client(sandbox, key: str) -> stripe.StripeClient:
    base = f"{sandbox.url}/stripe"
    return stripe.StripeClient(key, base_addresses={"api": base, "meter_events": base}, max_network_retries=0)


def test_stripe_meters_event_summaries_and_error_reports_read_back_with_the_sdk(sandbox):
    sandbox.faults({"kind": "invalid-after-ack", "every": 3, "destination": "stripe"})
    session = stripe_client(sandbox, STRIPE_KEY).v2.billing.meter_event_session.create()
    values = ["0.1", "7", "1.5", "3", "0.2", "4"]  # cus_A: s0 + s4 (s2 is invalid), 0.1 + 0.2
    events = [
        {
            "event_name": "tokens",
            "identifier": f"s{i}",
            "timestamp": z((HOUR_A if i < 3 else HOUR_B) + dt.timedelta(minutes=i)),
            "payload": {"stripe_customer_id": "cus_A" if i % 2 == 0 else "cus_B", "value": value},
        }
        for i, value in enumerate(values)
    ]
    stripe_client(sandbox, session.authentication_token).v2.billing.meter_event_stream.create(
        {"events": events}
    )
    assert sandbox.stats("stripe")["invalid_ids"] == ["s2", "s5"]
    client = stripe_client(sandbox, STRIPE_KEY)
    meters = client.v1.billing.meters.list()
    assert [meter.event_name for meter in meters.data] == ["tokens"]
    meter = meters.data[0]
    assert isinstance(meter, stripe.billing.Meter) and meter.value_settings.event_payload_key == "value"
    window = {
        "start_time": int(HOUR_A.timestamp()),
        "end_time": int((HOUR_B + dt.timedelta(hours=1)).timestamp()),
    }
    whole = client.v1.billing.meters.event_summaries.list(meter.id, {"customer": "cus_A", **window})
    assert [type(s) for s in whole.data] == [stripe.billing.MeterEventSummary]
    assert whole.data[0].aggregated_value == 0.3  # exact: float addition gives 0.30000000000000004
    assert (whole.data[0].start_time, whole.data[0].end_time, whole.data[0].meter) == (
        window["start_time"],
        window["end_time"],
        meter.id,
    )
    hourly = client.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": "cus_B", "value_grouping_window": "hour", **window}
    )
    assert [s.aggregated_value for s in hourly.data] == [3, 7]  # newest first: s3 | s1 (s5 is invalid)
    assert [s.start_time for s in hourly.data] == [int(HOUR_B.timestamp()), int(HOUR_A.timestamp())]
    with pytest.raises(stripe.InvalidRequestError):  # minute-aligned times only
        client.v1.billing.meters.event_summaries.list(
            meter.id,
            {"customer": "cus_A", "start_time": window["start_time"] + 1, "end_time": window["end_time"]},
        )
    reports = client.v2.core.events.list({"object_id": meter.id})
    assert [type(event) for event in reports.data] == [V1BillingMeterErrorReportTriggeredEvent]
    report = reports.data[0]
    assert report.related_object.id == meter.id
    assert report.data.reason.error_count == 2
    samples = report.data.reason.error_types[0].sample_errors
    assert [sample.request.identifier for sample in samples] == ["s2", "s5"]
    assert report.data.reason.error_types[0].code == "meter_event_customer_not_found"
    with pytest.raises(stripe.AuthenticationError):
        stripe_client(sandbox, "sk_wrong").v1.billing.meters.list()


# --- the target's own runs: the fault counts items across requests -----------------------


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_lost_after_ack_hits_every_nth_item_across_the_targets_requests(sandbox, tmp_path, destination):
    config = config_for(destination, sandbox, batch_size_rows=10, max_requests_in_flight=1)
    lines = singer("usage", usage(35), key_properties=["id"])
    assert run_target(tmp_path, config, lines).returncode == 0
    sent = [item[CASES[destination].id_field] for item in sandbox.items(destination)]  # in the order sent
    assert len(sent) == 35 and sandbox.stats(destination)["requests"] == 4
    sandbox.reset()
    sandbox.faults({"kind": "lost-after-ack", "every": 7})
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 0, result.stderr  # acknowledged: the target cannot know
    stats = sandbox.stats(destination)
    assert stats["lost_ids"] == sent[6::7] and stats["lost_after_ack"] == 5
    assert [item[CASES[destination].id_field] for item in sandbox.items(destination)] == [
        key for key in sent if key not in sent[6::7]
    ]


def metronome_events(*keys: str) -> list[dict]:
    """Events named after their keys (each read back must be its own line of the store)."""
    stamp = z(HOUR_A)
    return [
        {"transaction_id": k, "customer_id": "c", "event_type": f"type-{k}", "timestamp": stamp} for k in keys
    ]


def test_item_faults_from_the_command_line_and_for_every_destination(tmp_path):
    sandbox = start_sandbox(
        tmp_path,
        "--fault",
        "lost-after-ack:count=2:destination=metronome",
        "--fault",
        "invalid-after-ack:every=2",
    )
    try:
        client = metronome.Metronome(bearer_token=METRONOME_TOKEN, base_url=sandbox.url)
        client.v1.usage.ingest(usage=metronome_events("a", "b", "c", "d", "e"))
        client.v1.usage.ingest(usage=metronome_events("a", "c", "f"))  # a re-sent "a" is lost again
        stats = sandbox.stats("metronome")
        assert stats["lost_ids"] == ["a", "b"]  # count=2: the first two new items, then it is spent
        # every 2nd new item: b, d, then a (the 6th); b was lost, which takes precedence
        assert stats["invalid_ids"] == ["d", "a"]
        stored = [item["transaction_id"] for item in sandbox.items("metronome")]
        assert stored == ["c", "d", "e", "a", "f"]
        search = client.v1.usage.search(transaction_ids=["a", "b", "c", "d"])
        assert [(i.transaction_id, i.matched_customer is None) for i in search] == [
            ("a", True),
            ("c", False),
            ("d", True),
        ]
        # without a destination, invalid-after-ack leaves Orb alone (it validates in the request)
        orb_client = orb.Orb(api_key=ORB_KEY, base_url=f"{sandbox.url}/orb/v1")
        orb_client.events.ingest(
            events=[
                {
                    "idempotency_key": f"o{i}",
                    "event_name": "e",
                    "timestamp": z(HOUR_A),
                    "external_customer_id": "c",
                    "properties": {},
                }
                for i in range(4)
            ]
        )
        assert (sandbox.stats("orb")["invalid_ids"], sandbox.stats("orb")["stored"]) == ([], 4)
    finally:
        stop_sandbox(sandbox)


def test_an_unknown_item_fault_spec_is_refused_by_the_command_line(tmp_path):
    with pytest.raises(RuntimeError, match="invalid-after-ack does not apply"):
        start_sandbox(tmp_path, "--fault", "invalid-after-ack:every=3:destination=lago")


def test_reads_find_items_stored_before_a_restart(tmp_path):
    sandbox = start_sandbox(tmp_path)
    client = metronome.Metronome(bearer_token=METRONOME_TOKEN, base_url=sandbox.url)
    client.v1.usage.ingest(usage=metronome_events("r1", "r2"))
    stop_sandbox(sandbox)
    sandbox = start_sandbox(tmp_path)  # the same data directory
    try:
        client = metronome.Metronome(bearer_token=METRONOME_TOKEN, base_url=sandbox.url)
        client.v1.usage.ingest(usage=metronome_events("r2", "r3"))  # r2: a duplicate, not stored again
        found = client.v1.usage.search(transaction_ids=["r1", "r2", "r3"])
        assert [(item.transaction_id, item.event_type) for item in found] == [
            ("r1", "type-r1"),
            ("r2", "type-r2"),
            ("r3", "type-r3"),
        ]
        assert sandbox.stats("metronome")["duplicates"] == 1
    finally:
        stop_sandbox(sandbox)
