"""Segment-shaped sample events as Singer messages, for demos, tests and benchmarks.

``python -m target_usage_billing.sandbox.samples --count 1000 > events.singer.jsonl``

Events follow the Segment spec (messageId, type, event, userId, context.groupId,
properties, timestamp, ...): mostly ``track`` calls ("API Request", "Tokens Consumed"),
with ``identify`` and ``page`` calls that a filter should drop. Timestamps fall in the
``hours`` before ``end`` (default: now), so Metronome's 34-day window accepts them.
The same seed and end always give the same file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import typing as t

STREAM = "segment_events"
SCHEMA = {
    "type": "SCHEMA",
    "stream": STREAM,
    "key_properties": ["messageId"],
    "schema": {
        "type": "object",
        "properties": {
            "messageId": {"type": "string"},
            "type": {"type": "string"},
            "event": {"type": ["string", "null"]},
            "name": {"type": ["string", "null"]},
            "userId": {"type": ["string", "null"]},
            "anonymousId": {"type": ["string", "null"]},
            "context": {"type": ["object", "null"]},
            "properties": {"type": ["object", "null"]},
            "traits": {"type": ["object", "null"]},
            "timestamp": {"type": "string", "format": "date-time"},
            "sentAt": {"type": ["string", "null"], "format": "date-time"},
            "receivedAt": {"type": ["string", "null"], "format": "date-time"},
        },
    },
}
ENDPOINTS = ["/v1/search", "/v1/embed", "/v1/complete", "/v1/classify"]
REGIONS = ["eu-west-1", "us-east-1", "ap-southeast-2"]
MODELS = ["atlas-small", "atlas-large"]


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def segment_event(rng: random.Random, index: int, moment: dt.datetime, accounts: int) -> dict:
    account = f"acct-{rng.randrange(accounts):04d}"
    user = f"user-{rng.randrange(accounts * 20):06d}"
    roll = rng.random()
    base: dict[str, t.Any] = {
        "messageId": f"msg-{rng.getrandbits(64):016x}-{index}",
        "userId": user,
        "anonymousId": f"anon-{rng.getrandbits(32):08x}",
        "context": {
            "groupId": account,
            "library": {"name": "analytics-node", "version": "6.2.0"},
            "ip": f"203.0.113.{rng.randrange(1, 255)}",
        },
        "timestamp": _iso(moment),
        "sentAt": _iso(moment + dt.timedelta(milliseconds=rng.randrange(5, 400))),
        "receivedAt": _iso(moment + dt.timedelta(milliseconds=rng.randrange(400, 900))),
    }
    if roll < 0.60:
        tokens = rng.randrange(20, 8000)
        base |= {
            "type": "track",
            "event": "API Request",
            "properties": {
                "endpoint": rng.choice(ENDPOINTS),
                "region": rng.choice(REGIONS),
                "requests": 1,
                "tokens": tokens,
                # exact decimals on purpose: the target must not round them
                "compute_seconds": float(f"{rng.uniform(0.001, 9.5):.3f}"),
                "cost_usd": float(f"{tokens * 0.0000021:.7f}"),
            },
        }
    elif roll < 0.80:
        base |= {
            "type": "track",
            "event": "Tokens Consumed",
            "properties": {
                "model": rng.choice(MODELS),
                "input_tokens": rng.randrange(10, 4000),
                "output_tokens": rng.randrange(10, 2000),
            },
        }
    elif roll < 0.90:
        base |= {"type": "identify", "traits": {"plan": rng.choice(["free", "team", "enterprise"])}}
    else:
        base |= {"type": "page", "name": "Pricing", "properties": {"path": "/pricing"}}
    return base


def singer_lines(
    count: int,
    *,
    seed: int = 7,
    end: dt.datetime | None = None,
    hours: float = 48.0,
    accounts: int = 50,
    state_every: int = 1000,
) -> t.Iterator[str]:
    """SCHEMA, then ``count`` RECORDs in time order, with a STATE every ``state_every``."""
    rng = random.Random(seed)
    end = (end or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    start = end - dt.timedelta(hours=hours)
    step = dt.timedelta(hours=hours) / max(count, 1)
    yield json.dumps(SCHEMA)
    for index in range(count):
        moment = start + step * index
        record = segment_event(rng, index, moment, accounts)
        yield json.dumps({"type": "RECORD", "stream": STREAM, "record": record})
        if state_every and (index + 1) % state_every == 0:
            yield json.dumps({"type": "STATE", "value": {"bookmarks": {STREAM: {"position": index + 1}}}})
    yield json.dumps({"type": "STATE", "value": {"bookmarks": {STREAM: {"position": count}}}})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--hours", type=float, default=48.0, help="time span before --end")
    parser.add_argument("--end", help="ISO time of the last event (default: now)")
    parser.add_argument("--state-every", type=int, default=1000)
    args = parser.parse_args(argv)
    end = dt.datetime.fromisoformat(args.end.replace("Z", "+00:00")) if args.end else None
    out = sys.stdout
    for line in singer_lines(
        args.count, seed=args.seed, end=end, hours=args.hours, state_every=args.state_every
    ):
        out.write(line + "\n")


if __name__ == "__main__":
    main()
