"""In-process tests of Delivery and UsageSink, beside the subprocess tests.

Delivery is driven directly (its own threads, the real Metronome destination and
transport) against the sandbox on loopback; the sink is driven through an in-process
target in dry-run mode, whose request bodies are the sink's batches exactly.
"""

from __future__ import annotations

import gc
import io
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from target_usage_billing.deadletter import DeadLetters
from target_usage_billing.delivery import Batch, Delivery
from target_usage_billing.destinations.metronome import MetronomeDestination
from target_usage_billing.errors import DeliveryError
from target_usage_billing.http import HttpTransport
from target_usage_billing.journal import Journal
from target_usage_billing.journal_store import SqliteJournalStore
from target_usage_billing.ratelimit import RateLimiter
from target_usage_billing.stats import RunStats
from target_usage_billing.target import TargetUsageBilling
from tests.helpers import RECENT, wait_until
from tests.platforms import METRONOME_TOKEN

# --- Delivery ------------------------------------------------------------------------

RECENT_TEXT = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(RECENT))


class Harness:
    """A Delivery wired as the run wires it, recording what it releases and when."""

    def __init__(self, sandbox, tmp_path: Path, *, retry_seconds: float = 30.0, in_flight: int = 4):
        config = {"metronome_api_token": METRONOME_TOKEN, "metronome_api_url": sandbox.url}
        self.transport = HttpTransport(retry_budget_seconds=retry_seconds, backoff_base_seconds=0.05)
        self.destination = MetronomeDestination(config, self.transport)
        self.dead_letters = DeadLetters(str(tmp_path / "dead-letters.jsonl"), [])
        self.released: list[dict] = []
        self.lock = threading.Lock()
        self.stats = RunStats()
        self.stats.stream("usage")  # as the sink of stream usage registers it
        self.delivery = Delivery(
            self.destination,
            self.transport,
            RateLimiter(()),
            self.dead_letters,
            self.stats,
            max_in_flight=in_flight,
            on_states=self._on_states,
        )

    def _on_states(self, states: list[dict]) -> None:
        with self.lock:
            self.released.extend(states)

    def items(self, first: int, count: int, marker: str = "") -> list:
        out = []
        for n in range(first, first + count):
            event = {
                "transaction_id": f"t{n}",
                "customer_id": "acct",
                "event_type": "tokens",
                "timestamp": RECENT_TEXT,
                "properties": {"n": str(n), "note": marker},
            }
            line = json.dumps({"type": "RECORD", "stream": "usage", "record": {"n": n}}).encode()
            out.append((json.dumps(event).encode(), line, n + 1, "mappings[0]"))
        return out

    def close(self) -> None:
        self.delivery.close()
        self.dead_letters.close()


@pytest.fixture
def harness(sandbox, tmp_path):
    made: list[Harness] = []

    def make(**options) -> Harness:
        made.append(Harness(sandbox, tmp_path, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_states_are_released_in_order_and_only_behind_acknowledged_batches(sandbox, harness):
    h = harness()
    # the first batch is slow: the second is acknowledged first, its STATE must wait
    sandbox.faults({"kind": "slow", "count": 1, "delay_ms": 1500})
    h.delivery.submit("usage", h.items(0, 10), buffer=1, first_index=0)
    time.sleep(0.2)  # the slow one is in flight
    h.delivery.submit("usage", h.items(10, 10), buffer=1, first_index=10)
    h.delivery.add_state({"upto": 10}, 10)
    h.delivery.add_state({"upto": 20}, 20)
    wait_until(lambda: sandbox.stats("metronome")["accepted"] == 10)  # the fast batch
    assert h.released == []  # nothing before the slow first batch is acknowledged
    assert h.delivery.wait(time.monotonic() + 30)
    assert h.released == [{"upto": 10}, {"upto": 20}]
    assert sandbox.stats("metronome")["accepted"] == 20


def test_an_idle_worker_keeps_no_batch_alive(sandbox, harness):
    # A worker waiting for work used to keep its last batch (items and their input lines,
    # released from every budget) alive: 64 workers held 64 MB of m3ter batches.
    h = harness(in_flight=8)
    for n in range(8):
        h.delivery.submit("usage", h.items(n * 10, 10, marker="idle"), buffer=1, first_index=n * 10)
    assert h.delivery.wait(time.monotonic() + 30)
    assert sandbox.stats("metronome")["accepted"] == 80

    def batches_alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is Batch and b'"idle"' in o.items[0][0])

    wait_until(lambda: batches_alive() == 0, timeout=10)


def test_the_batch_that_failed_the_run_is_not_kept_alive_by_its_error(sandbox, harness):
    # The run's failure is kept until the run ends; its traceback's frames held the batch
    # being sent (items and input lines), a whole batch outside every budget.
    h = harness(retry_seconds=0.5)
    sandbox.faults({"kind": "503", "count": 1000})
    h.delivery.submit("usage", h.items(0, 10, marker="failed"), buffer=1, first_index=0)
    h.delivery.wait(time.monotonic() + 30)
    with pytest.raises(DeliveryError):
        h.delivery.raise_if_failed()

    def batches_alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is Batch and b'"failed"' in o.items[0][0])

    wait_until(lambda: batches_alive() == 0, timeout=10)


def test_while_states_wait_the_journal_keeps_a_few_epochs_not_one_per_state(sandbox, harness, tmp_path):
    # The first batch is slow: the 29 STATEs after it cannot go out, and each would have
    # kept its own epoch (aggregates, samples, a batch of ids per stream) until then.
    h = harness(in_flight=4)
    path = tmp_path / "journal.sqlite"
    journal = h.delivery.journal = Journal(
        SqliteJournalStore(str(path)), "scope", h.destination.journal_fields
    )
    sandbox.faults({"kind": "slow", "count": 1, "delay_ms": 4000})
    h.delivery.buffer_started(1, 0)
    h.delivery.submit("usage", h.items(0, 10), buffer=1, first_index=0)
    time.sleep(0.2)  # the slow one is in flight
    for n in range(1, 30):
        h.delivery.add_state({"upto": n * 10}, n * 10)
        h.delivery.buffer_started(1, n * 10)
        h.delivery.submit("usage", h.items(n * 10, 10), buffer=1, first_index=n * 10)
    wait_until(lambda: sandbox.stats("metronome")["accepted"] == 290)
    assert h.released == []
    assert len(journal._epochs) <= 2  # the 28 epochs STATE 29 will commit are one
    assert h.delivery.wait(time.monotonic() + 30)
    assert h.released == [{"upto": 10}, {"upto": 290}]  # the first, then the latest
    journal.commit()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT SUM(items) FROM journal_buckets").fetchone() == (300,)
        tail = db.execute("SELECT ids FROM journal_tails WHERE stream = 'usage'").fetchone()[0]
    assert tail.split("\n") == [f"t{n}" for n in range(290, 300)]  # the last batch's ids


def test_a_state_waits_for_a_buffer_that_is_not_yet_handed_over(sandbox, harness):
    h = harness()
    h.delivery.buffer_started(7, 0)  # a sink holds records 0.. in its buffer
    h.delivery.add_state({"upto": 5}, 5)
    time.sleep(0.3)
    assert h.released == []
    h.delivery.submit("usage", h.items(0, 5), buffer=7, first_index=0)
    assert h.delivery.wait(time.monotonic() + 30)
    assert h.released == [{"upto": 5}]


def test_at_most_two_states_wait_however_many_the_tap_writes(sandbox, harness):
    h = harness()
    h.delivery.buffer_started(7, 0)  # a sink holds records 0.. in its buffer
    for n in range(1, 10_001):  # a STATE after every record of a long backfill
        h.delivery.add_state({"upto": n}, n)
        assert len(h.delivery._states) <= 2
    h.delivery.submit("usage", h.items(0, 5), buffer=7, first_index=0)
    assert h.delivery.wait(time.monotonic() + 30)
    assert h.released == [{"upto": 1}, {"upto": 10_000}]  # the next to go, then the latest


def test_a_refused_item_is_split_out_and_the_rest_delivered(sandbox, harness, tmp_path):
    h = harness()
    sandbox.faults(refuse_items_containing=["REFUSE-ME"])
    items = h.items(0, 8)
    items[5] = h.items(5, 1, marker="REFUSE-ME")[0]
    h.delivery.submit("usage", items, buffer=1, first_index=0)
    h.delivery.add_state({"upto": 8}, 8)
    assert h.delivery.wait(time.monotonic() + 30)
    stored = sorted(int(item["properties"]["n"]) for item in sandbox.items("metronome"))
    assert stored == [0, 1, 2, 3, 4, 6, 7]
    h.dead_letters.sync()
    (letter,) = [json.loads(line) for line in (tmp_path / "dead-letters.jsonl").read_text().splitlines()]
    assert letter["record"] == {"n": 5} and letter["stage"] == "api"
    assert h.released == [{"upto": 8}]  # a dead-lettered record is done


def test_no_state_is_released_after_a_batch_failed(sandbox, harness):
    h = harness(retry_seconds=0.5)
    sandbox.faults({"kind": "503", "count": 1000})
    h.delivery.add_state({"before": 0}, 0)  # nothing before it: released at once
    h.delivery.submit("usage", h.items(0, 3), buffer=1, first_index=0)
    h.delivery.add_state({"after": 3}, 3)
    h.delivery.wait(time.monotonic() + 30)
    with pytest.raises(DeliveryError):
        h.delivery.raise_if_failed()
    assert h.released == [{"before": 0}]
    sandbox.faults()  # the API recovers: the failed batch is still not resent
    h.delivery.add_state({"later": 3}, 3)
    time.sleep(0.3)
    assert h.released == [{"before": 0}]


# --- UsageSink -------------------------------------------------------------------------


def dry_run(tmp_path: Path, records: list[dict], **settings) -> tuple[list[dict], TargetUsageBilling]:
    """Run the target in-process on ``records`` (stream ``usage``); its request bodies."""
    config = {
        "destination": "metronome",
        "dry_run": True,
        "dry_run_path": str(tmp_path / "requests.jsonl"),
        "dead_letter_path": str(tmp_path / "dead-letters.jsonl"),
        "progress_interval_seconds": 0,
        "max_rejected_ratio": 1,  # a few records, some rejected on purpose
        "mappings": [
            {
                "stream": "usage",
                "fields": {
                    "transaction_id": "id",
                    "customer_id": "account",
                    "event_type": "'tokens'",
                    "timestamp": "at",
                    "properties": {"tokens": "tokens", "note": "note"},
                },
            }
        ],
        **settings,
    }
    lines = [
        {
            "type": "SCHEMA",
            "stream": "usage",
            "schema": {"type": "object", "properties": {}},
            "key_properties": [],
        }
    ]
    lines += [{"type": "RECORD", "stream": "usage", "record": record} for record in records]
    target = TargetUsageBilling(config=config, validate_config=True)
    target.listen(io.StringIO("".join(json.dumps(line) + "\n" for line in lines)))
    path = tmp_path / "requests.jsonl"
    requests = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return requests, target


def rows(count: int, **extra) -> list[dict]:
    return [{"id": f"r{n}", "account": "acct", "at": RECENT, "tokens": n, **extra} for n in range(count)]


def test_the_sink_cuts_batches_at_the_row_limit(tmp_path):
    requests, _ = dry_run(tmp_path, rows(7), batch_size_rows=3)
    # batches go out on worker threads: their lines may be written in any order
    batches = sorted([event["transaction_id"] for event in request["body"]] for request in requests)
    assert batches == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]
    assert sorted(request["items"] for request in requests) == [1, 3, 3]


def test_the_sink_cuts_batches_before_the_byte_limit(tmp_path):
    requests, _ = dry_run(tmp_path, rows(40, note="x" * 200), batch_max_bytes=2048)
    assert sum(request["items"] for request in requests) == 40
    for request in requests:
        assert len(json.dumps(request["body"], separators=(",", ":")).encode()) <= 2048
    assert len(requests) > 1


def test_the_sink_skips_a_repeated_event_and_dead_letters_a_conflicting_one(tmp_path):
    records = rows(3)
    records.append(dict(records[0]))  # the same event again
    records.append({**records[1], "tokens": 99})  # same id, different usage
    requests, target = dry_run(tmp_path, records)
    counts = target.billing_run.stats.stream("usage")
    assert (counts.read, counts.mapped, counts.duplicates, counts.rejected) == (5, 3, 1, 1)
    assert [event["transaction_id"] for event in requests[0]["body"]] == ["r0", "r1", "r2"]
    (letter,) = [json.loads(line) for line in (tmp_path / "dead-letters.jsonl").read_text().splitlines()]
    assert letter["stage"] == "conflict" and letter["record"]["tokens"] == 99


def test_the_sink_dead_letters_a_record_it_cannot_map_and_goes_on(tmp_path):
    records = rows(3)
    records[1]["at"] = "not a time"
    requests, _target = dry_run(tmp_path, records)
    assert [event["transaction_id"] for event in requests[0]["body"]] == ["r0", "r2"]
    (letter,) = [json.loads(line) for line in (tmp_path / "dead-letters.jsonl").read_text().splitlines()]
    assert letter["stage"] == "mapping" and letter["field"] == "timestamp" and letter["line"] == 3


def test_rejection_reasons_kept_per_stream_are_bounded_whatever_the_run():
    stats = RunStats()
    stats.stream("usage")
    for n in range(5000):  # each conflict names its id; each bad value its own field
        stats.add_rejected(
            "usage", "conflict", f"id '{n}' was already sent in this run with a different body: ..."
        )
        stats.add_rejected("usage", "mapping", f"field 'f{n}' is not a number, got 'x'")
    reasons = stats.streams["usage"].reasons
    assert reasons["conflict: an id already sent in this run with a different body"] == 5000
    assert len(reasons) == 101  # 100 kept, and the rest together
    assert sum(reasons.values()) == 10_000  # every rejection still counted
    assert reasons["other reasons (past the first 100 distinct ones)"] == 5000 - 99
