"""Orb's backfill flow: usage older than the grace period, against the sandbox, with Orb's
official SDK (orb-billing: ``events.backfills`` and its types) as the referee."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess

import msgspec
import orb
import pytest
from orb.types.events.backfill_create_params import BackfillCreateParams
from orb.types.events.backfill_list_response import BackfillListResponse

from target_usage_billing.sandbox.orb_backfills import CreateBody
from tests.helpers import RECENT, TARGET, dead_letters, run_target, singer, usage, wait_until
from tests.platforms import CASES, ORB_KEY, config_for
from tests.test_orb import event

DAY = 86400
UTC = dt.timezone.utc


def orb_client(sandbox) -> orb.Orb:
    return orb.Orb(api_key=ORB_KEY, base_url=f"{sandbox.url}/orb/v1", max_retries=0)


def history_rows() -> list[dict]:
    """Two rows inside the grace period, three older: two customers, two 31-day slots."""
    rows = usage(5)
    rows[2].update(account="acct-old", at=RECENT - 3 * DAY)
    rows[3].update(account="acct-old", at=RECENT - 40 * DAY)
    rows[4].update(account="acct-older", at=RECENT - 3 * DAY)
    return rows


def backfills(sandbox) -> list[BackfillListResponse]:
    return list(orb_client(sandbox).events.backfills.list())


# --- the target ----------------------------------------------------------------------------


def test_without_orb_backfill_old_usage_is_dead_lettered_and_counted(sandbox, tmp_path):
    rows = history_rows()
    result = run_target(
        tmp_path, config_for("orb", sandbox, max_rejected_ratio=1), singer("usage", rows, state={"at": 5})
    )
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("orb")["stored"] == 2
    dead = dead_letters(tmp_path)
    assert sorted(d["record"]["id"] for d in dead) == [2, 3, 4]
    for letter in dead:
        assert letter["stage"] == "validation"
        assert "older than Orb's ingestion grace period" in letter["reason"]
        assert "orb_backfill" in letter["reason"]
    # said once for the stream while it runs, and counted per stream in the summary
    assert result.stderr.count("records outside Orb's time window are dead-lettered") == 1
    assert "outside Orb's time window: 3 records, dead-lettered (stage validation)" in result.stderr
    assert "rejected 3 x validation: timestamp is older than Orb's ingestion grace period" in result.stderr
    assert backfills(sandbox) == []
    assert result.states == [{"at": 5}]


def test_with_orb_backfill_old_usage_lands_through_closed_backfills(sandbox, tmp_path):
    rows = history_rows()
    config = config_for("orb", sandbox, orb_backfill=True)
    result = run_target(tmp_path, config, singer("usage", rows, state={"at": 5}))
    assert result.returncode == 0, result.stderr
    assert dead_letters(tmp_path) == []
    stored = {item["idempotency_key"]: item for item in sandbox.items("orb")}
    assert len(stored) == 5  # the live ones and, once the backfills closed, the older ones
    found = sorted(backfills(sandbox), key=lambda b: (b.customer_id, b.timeframe_start))
    # one backfill per customer and 31-day slot, each within 31 days, all closed (reflected)
    assert [(b.customer_id, b.events_ingested, b.status) for b in found] == [
        ("acct-old", 1, "reflected"),
        ("acct-old", 1, "reflected"),
        ("acct-older", 1, "reflected"),
    ]
    now = dt.datetime.now(UTC)
    for backfill in found:
        assert backfill.timeframe_end - backfill.timeframe_start <= dt.timedelta(days=31)
        assert backfill.timeframe_end <= now - dt.timedelta(hours=12)  # never into the grace period
        assert backfill.replace_existing_events is False
    assert "Orb backfills: 3 closed, 3 events in them" in result.stderr
    assert "sent 3 of them into Orb backfills" in result.stderr
    assert result.states == [{"at": 5}]
    # a second run sends the same history again: Orb keeps each idempotency key once
    again = run_target(tmp_path, config, singer("usage", rows, state={"at": 5}))
    assert again.returncode == 0, again.stderr
    assert sandbox.stats("orb")["stored"] == 5


def test_replace_existing_events_only_when_asked(sandbox, tmp_path):
    rows = usage(1)
    rows[0].update(account="acct-old", at=RECENT - 3 * DAY)
    config = config_for("orb", sandbox, orb_backfill=True, orb_backfill_replace_existing_events=True)
    result = run_target(tmp_path, config, singer("usage", rows))
    assert result.returncode == 0, result.stderr
    (backfill,) = backfills(sandbox)
    assert backfill.replace_existing_events is True and backfill.status == "reflected"


def test_a_failure_mid_backfill_reverts_it_and_no_state_covers_it(sandbox, tmp_path):
    rows = usage(3)
    for row in rows:  # one customer, one slot: one backfill
        row.update(account="acct-old", at=RECENT - 3 * DAY + row["id"])
    # the first request goes into the backfill; the second meets a refused key: exit 3
    sandbox.faults({"kind": "401", "every": 2, "destination": "orb"})
    config = config_for("orb", sandbox, orb_backfill=True, batch_size_rows=1, max_requests_in_flight=1)
    result = run_target(
        tmp_path, config, singer("usage", rows[:1], state={"at": 1}) + singer("usage", rows[1:])[1:]
    )
    assert result.returncode == 3, result.stderr
    assert result.states == []  # no STATE covers usage of a reverted backfill
    (backfill,) = backfills(sandbox)
    assert backfill.status == "reverted" and backfill.reverted_at is not None
    assert sandbox.stats("orb")["stored"] == 0
    assert (
        "reverted (1 events): the run did not deliver everything; re-run from the last STATE" in result.stderr
    )
    assert "Orb backfills: 1 reverted, 1 events in them" in result.stderr


def test_a_lost_answer_to_a_create_makes_no_second_backfill(sandbox, tmp_path):
    rows = history_rows()[2:3]
    # created, then the connection drops: the retry carries the same Idempotency-Key
    sandbox.faults({"kind": "stored-drop", "count": 1, "destination": "orb", "path": "/v1/events/backfills"})
    result = run_target(tmp_path, config_for("orb", sandbox, orb_backfill=True), singer("usage", rows))
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("orb")["faults_applied"] == 1
    (backfill,) = backfills(sandbox)
    assert backfill.status == "reflected" and backfill.events_ingested == 1


def test_a_close_that_fails_reverts_every_backfill_of_the_run(sandbox, tmp_path):
    # two backfills: the first close goes through, the second is refused (413: not retried)
    sandbox.faults({"kind": "413", "every": 2, "destination": "orb", "path": "/close"})
    rows = history_rows()
    result = run_target(tmp_path, config_for("orb", sandbox), singer("usage", rows[:2]))  # the live ones
    assert result.returncode == 0
    config = config_for("orb", sandbox, orb_backfill=True)
    result = run_target(tmp_path, config, singer("usage", [rows[2], rows[4]], state={"at": 5}))
    assert result.returncode == 4, result.stderr
    assert "closing an Orb backfill failed, so the run's backfills were reverted" in result.error_lines[0]
    found = backfills(sandbox)
    assert len(found) == 2 and all(b.status == "reverted" for b in found)  # the closed one too
    assert sandbox.stats("orb")["stored"] == 2  # the live events only
    assert result.states == []


def test_a_stop_signal_before_everything_was_delivered_reverts_the_backfills(sandbox, tmp_path):
    rows = history_rows()[2:3]
    sandbox.faults({"kind": "slow", "count": 1, "delay_ms": 4000, "destination": "orb"})
    config = config_for("orb", sandbox, orb_backfill=True, shutdown_grace_seconds=0.5)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    input_path = tmp_path / "input.jsonl"
    input_path.write_text("\n".join(singer("usage", rows, state={"at": 3})) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_USAGE_BILLING_")}
    with open(input_path, "rb") as stdin:
        child = subprocess.Popen(
            [TARGET, "--config", str(config_path)],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
            env=env,
        )
    wait_until(lambda: sandbox.stats("orb")["faults_applied"] == 1, timeout=30)  # the ingest waits
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 7, stderr.decode()
    assert stdout == b""  # no STATE
    (backfill,) = backfills(sandbox)
    assert backfill.status == "reverted"


def test_a_state_waits_for_the_close_of_the_backfills_before_it(sandbox, tmp_path):
    # an old row, a STATE, then rows that fail: the STATE would cover the backfilled row,
    # whose backfill is reverted when the run fails, so it is never written
    old = usage(1)
    old[0].update(account="acct-old", at=RECENT - 3 * DAY)
    lines = singer("usage", old, state={"at": 1})
    lines += [json.dumps({"type": "RECORD", "stream": "usage", "record": r}) for r in usage(2, start=1)]
    lines.append("{not json")
    config = config_for("orb", sandbox, orb_backfill=True, batch_size_rows=1)
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 5, result.stderr  # bad input: everything before it is delivered
    (backfill,) = backfills(sandbox)
    assert backfill.status == "reflected"  # delivered whole before the bad line: closed
    assert result.states == [{"at": 1}]  # and only then the STATE after it
    assert sandbox.stats("orb")["stored"] == 3


# --- the sandbox's contract, through the official SDK -----------------------------------------


def test_the_sandbox_refuses_late_events_without_a_backfill_and_takes_them_in_one(sandbox):
    old = event("old", timestamp=(dt.datetime.now(UTC) - dt.timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    refused = CASES["orb"].post_items(sandbox, [old])
    assert refused.status_code == 400
    (failed,) = refused.json()["validation_failed"]
    assert "grace period" in failed["validation_errors"][0] and "backfill" in failed["validation_errors"][0]

    client = orb_client(sandbox)
    now = dt.datetime.now(UTC)
    params: BackfillCreateParams = {
        "timeframe_start": now - dt.timedelta(days=10),
        "timeframe_end": now - dt.timedelta(days=1),
        "external_customer_id": "acct-1",
    }
    backfill = client.events.backfills.create(**params)
    assert backfill.status == "pending" and backfill.events_ingested == 0
    assert client.events.ingest(events=[old], backfill_id=backfill.id).validation_failed == []
    assert sandbox.stats("orb")["stored"] == 0  # not reflected before the close
    closed = client.events.backfills.close(backfill.id)
    assert closed.status == "reflected" and closed.events_ingested == 1
    assert sandbox.stats("orb")["stored"] == 1
    reverted = client.events.backfills.revert(backfill.id)
    assert reverted.status == "reverted" and reverted.reverted_at is not None
    assert sandbox.stats("orb")["stored"] == 0
    assert client.events.backfills.fetch(backfill.id).status == "reverted"


def test_the_sandbox_enforces_timeframes_customers_and_overlaps(sandbox):
    client = orb_client(sandbox)
    now = dt.datetime.now(UTC)
    with pytest.raises(orb.BadRequestError):  # over 31 days
        client.events.backfills.create(
            timeframe_start=now - dt.timedelta(days=40), timeframe_end=now - dt.timedelta(days=1)
        )
    first = client.events.backfills.create(
        timeframe_start=now - dt.timedelta(days=10),
        timeframe_end=now - dt.timedelta(days=5),
        external_customer_id="a",
    )
    with pytest.raises(orb.BadRequestError, match="overlaps"):
        client.events.backfills.create(
            timeframe_start=now - dt.timedelta(days=6),
            timeframe_end=now - dt.timedelta(days=2),
            external_customer_id="a",
        )
    # another customer may overlap
    client.events.backfills.create(
        timeframe_start=now - dt.timedelta(days=6),
        timeframe_end=now - dt.timedelta(days=2),
        external_customer_id="b",
    )
    outside = event(
        "x", timestamp=(now - dt.timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ"), external_customer_id="a"
    )
    other = event(
        "y", timestamp=(now - dt.timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ"), external_customer_id="b"
    )
    with pytest.raises(orb.BadRequestError) as refused:
        client.events.ingest(events=[outside, other], backfill_id=first.id)
    reasons = {
        e["idempotency_key"]: e["validation_errors"][0] for e in refused.value.body["validation_failed"]
    }
    assert "outside backfill" in reasons["x"] and "scoped to external_customer_id 'a'" in reasons["y"]
    client.events.backfills.close(first.id)
    with pytest.raises(orb.BadRequestError, match="takes no more events"):
        client.events.ingest(events=[outside], backfill_id=first.id)


def test_the_sandbox_takes_exactly_the_sdks_create_parameters():
    # the sandbox refuses any other field, so every create the target made above fits
    assert set(CreateBody.__struct_fields__) == set(BackfillCreateParams.__annotations__)
    required = {
        f for f, d in zip(CreateBody.__struct_fields__, _defaults(CreateBody)) if d is msgspec.NODEFAULT
    }
    assert required == set(BackfillCreateParams.__required_keys__) | {"timeframe_start", "timeframe_end"}


def _defaults(struct: type) -> list:
    fields = struct.__struct_fields__
    defaults = struct.__struct_defaults__
    return [msgspec.NODEFAULT] * (len(fields) - len(defaults)) + list(defaults)


def test_a_dry_run_creates_no_backfill(sandbox, tmp_path):
    config = config_for("orb", sandbox, orb_backfill=True, dry_run=True)
    result = run_target(tmp_path, config, singer("usage", history_rows()))
    assert result.returncode == 0, result.stderr
    assert backfills(sandbox) == []
    (request,) = [json.loads(line) for line in (tmp_path / "dry-run-requests.jsonl").read_text().splitlines()]
    assert request["path"] == "/v1/ingest" and len(request["body"]["events"]) == 5


def test_a_pending_backfill_left_by_a_killed_run_is_named_when_it_blocks_the_next(sandbox, tmp_path):
    now = dt.datetime.now(UTC)
    left = orb_client(sandbox).events.backfills.create(
        timeframe_start=now - dt.timedelta(days=20),
        timeframe_end=now - dt.timedelta(days=1),
        external_customer_id="acct-old",
    )
    rows = history_rows()[2:3]  # acct-old, 3 days ago
    result = run_target(tmp_path, config_for("orb", sandbox, orb_backfill=True), singer("usage", rows))
    assert result.returncode == 4, result.stderr
    (error,) = result.error_lines
    assert "POST /v1/events/backfills answered 400" in error and f"overlaps backfill {left.id}" in error
    assert orb_client(sandbox).events.backfills.fetch(left.id).status == "pending"  # not the run's
