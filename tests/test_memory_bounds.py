"""Memory bounded by design: one buffer budget for all streams' partial batches.

(The id ledger's budget is held in test_ledger.py; peak RSS figures belong to
benchmarks/run.py --memory, not to timed tests.)
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from singer_sdk.singerlib import SingerMessageType

from target_usage_billing.target import TargetUsageBilling
from tests.helpers import RECENT


def many_streams_run(
    tmp_path: Path, streams: int, per_stream: int, **settings
) -> tuple[list[dict], int, int]:
    """A dry run over ``streams`` streams, records round-robin; (requests, most bytes ever
    buffered, budget)."""
    config = {
        "destination": "metronome",
        "dry_run": True,
        "dry_run_path": str(tmp_path / "requests.jsonl"),
        "dead_letter_path": str(tmp_path / "dead-letters.jsonl"),
        "progress_interval_seconds": 0,
        "metronome_max_property_bytes": 0,  # the 1 KB notes make each buffered item large
        "mappings": [
            {
                "stream": "usage_*",
                "fields": {
                    "transaction_id": "id",
                    "customer_id": "account",
                    "event_type": "'tokens'",
                    "timestamp": "at",
                    "properties": {"note": "note"},
                },
            }
        ],
        **settings,
    }
    lines = [
        {
            "type": "SCHEMA",
            "stream": f"usage_{s}",
            "schema": {"type": "object", "properties": {}},
            "key_properties": [],
        }
        for s in range(streams)
    ]
    for n in range(per_stream):
        for s in range(streams):
            record = {"id": f"{s}-{n}", "account": "acct", "at": RECENT, "note": "x" * 1000}
            lines.append({"type": "RECORD", "stream": f"usage_{s}", "record": record})
    target = TargetUsageBilling(config=config, validate_config=True)
    run = target.billing_run
    routes = target.message_reader.routes
    on_record = routes[SingerMessageType.RECORD]
    most = 0

    def watched(message: dict) -> None:
        nonlocal most
        on_record(message)
        held = sum(sink._held_bytes for sink in target._direct_sinks.values())
        assert held == run.buffered_bytes  # the shared total is what the buffers hold
        most = max(most, run.buffered_bytes)

    routes[SingerMessageType.RECORD] = watched
    target.listen(io.StringIO("".join(json.dumps(line) + "\n" for line in lines)))
    requests = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    return requests, most, run.buffer_budget


def test_all_streams_share_one_buffer_budget_and_the_oldest_buffer_goes_first(tmp_path):
    # 300 streams x 20 records of ~1.1 KB held each: ~6.6 MB without a shared budget
    requests, most, budget = many_streams_run(tmp_path, 300, 20, buffer_megabytes=1)
    assert budget == 2**20 and most <= budget
    sent = sorted(event["transaction_id"] for request in requests for event in request["body"])
    assert sent == sorted(f"{s}-{n}" for s in range(300) for n in range(20))  # each once
    # partial batches went out early, oldest first: stream 0's buffer started first
    assert requests[0]["items"] < 100 and requests[0]["body"][0]["transaction_id"] == "0-0"


def test_a_large_budget_keeps_full_batches(tmp_path):
    requests, most, budget = many_streams_run(tmp_path, 5, 200, buffer_megabytes=64)
    assert most <= budget
    assert [request["items"] for request in requests][:5] == [100] * 5  # nothing cut early
