"""A tap stand-in that honours STATE: `fake_tap.py --count N [--state F] [--every K] [--pause S]`.

Emits SCHEMA, then records id = position .. count-1 of stream `usage` (each record's
content depends only on its id, so a re-emitted record is identical), a STATE with the
next position every K records, and pauses S seconds after each STATE so that a target
can be stopped mid-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--state")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--stream", default="usage")
    parser.add_argument("--base-epoch", type=int, default=1795184122, help="time of record 0")
    args = parser.parse_args()
    start = 0
    if args.state:
        with open(args.state) as handle:
            start = json.load(handle)["bookmarks"][args.stream]["position"]
    out = sys.stdout
    schema = {"type": "object", "properties": {"id": {"type": "integer"}}, "additionalProperties": True}
    out.write(
        json.dumps({"type": "SCHEMA", "stream": args.stream, "schema": schema, "key_properties": ["id"]})
        + "\n"
    )
    for i in range(start, args.count):
        # the tokens literal is written by hand: an exact decimal the target must not round
        record = (
            f'{{"id": {i}, "account": "a{i % 13}", "at": {args.base_epoch + i}, '
            f'"tokens": {i}.125, "note": "n{i}"}}'
        )
        out.write(f'{{"type": "RECORD", "stream": "{args.stream}", "record": {record}}}\n')
        if (i + 1) % args.every == 0:
            state = {"bookmarks": {args.stream: {"position": i + 1}}}
            out.write(json.dumps({"type": "STATE", "value": state}) + "\n")
            out.flush()
            if args.pause:
                time.sleep(args.pause)
    out.write(
        json.dumps({"type": "STATE", "value": {"bookmarks": {args.stream: {"position": args.count}}}}) + "\n"
    )
    out.flush()


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the target was killed
        sys.exit(0)
