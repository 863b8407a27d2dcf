"""The benchmark's input loaded the way a user's own script would: the official SDK.

Reads the same Singer lines on stdin, maps each track call as the benchmark's rules do
(m3ter: benchmarks/run.py's M3TER_RULE; Metronome: the segment preset) and submits
batches through m3ter's ``usage.submit`` (1,000 measurements) or Metronome's
``v1.usage.ingest`` (100 events), one request at a time, as the SDKs' examples do. It
prints the number of items sent. ``benchmarks/run.py --official-sdk`` runs it beside the
target against the same sandbox and compares CPU time.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing as t

M3TER_MEASURES = ("requests", "tokens", "compute_seconds", "input_tokens", "output_tokens")


def m3ter_measurement(record: dict) -> dict:
    properties = record.get("properties") or {}
    measurement: dict[str, t.Any] = {
        "uid": record["messageId"],
        "meter": "llm_tokens" if record.get("event") == "Tokens Consumed" else "api_requests",
        "account": record["context"]["groupId"],
        "ts": record["timestamp"],
        "measure": {key: properties[key] for key in M3TER_MEASURES if properties.get(key) is not None},
    }
    # the API refuses nulls in its maps: keys without a value are left out, as the target does
    if record.get("userId") is not None:
        measurement["who"] = {"user": record["userId"]}
    if properties.get("region") is not None:
        measurement["where"] = {"region": properties["region"]}
    if properties.get("cost_usd") is not None:
        measurement["cost"] = {"usd": properties["cost_usd"]}
    return measurement


def metronome_event(record: dict) -> dict:
    return {
        "transaction_id": record["messageId"],
        "customer_id": record["context"]["groupId"],
        "event_type": record["event"],
        "timestamp": record["timestamp"],
        "properties": {key: str(value) for key, value in (record.get("properties") or {}).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("destination", choices=["m3ter", "metronome"])
    parser.add_argument("--url", required=True, help="the sandbox")
    args = parser.parse_args()
    submit: t.Callable[[list[dict]], t.Any]
    if args.destination == "m3ter":
        import m3ter

        m3ter_client = m3ter.M3ter(
            org_id="bench", api_key="sandbox-access-key", api_secret="sandbox-api-secret", base_url=args.url
        )
        size, build = 1000, m3ter_measurement

        def submit(batch: list[dict]) -> None:
            m3ter_client.usage.submit(measurements=t.cast(t.Any, batch))
    else:
        import metronome

        metronome_client = metronome.Metronome(bearer_token="sandbox-metronome-token", base_url=args.url)
        size, build = 100, metronome_event

        def submit(batch: list[dict]) -> None:
            metronome_client.v1.usage.ingest(usage=t.cast(t.Any, batch))

    batch: list[dict] = []
    sent = 0
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("type") != "RECORD" or message["record"].get("type") != "track":
            continue
        batch.append(build(message["record"]))
        if len(batch) == size:
            submit(batch)
            sent += len(batch)
            batch = []
    if batch:
        submit(batch)
        sent += len(batch)
    print(json.dumps({"sent": sent}))


if __name__ == "__main__":
    main()
