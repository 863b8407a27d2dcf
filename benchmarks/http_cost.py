"""Client CPU per request: the target's transport (requests) against bare http.client.

    python benchmarks/http_cost.py [--requests 2000]

Sends GET /v1/customers to a local sandbox in one thread and prints the CPU time
(process time, so the sandbox's own work is not counted) per request for each client.
Metronome's 100-event requests make this cost count: 2,400 requests per 300,000 events.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from target_usage_billing.http import HttpTransport
from target_usage_billing.sandbox.launch import launch

HEADERS = {"Authorization": "Bearer sandbox-metronome-token", "Content-Type": "application/json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    count = parser.parse_args().requests
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = launch(Path(tmp) / "sandbox", "--no-rate-limit")
        try:
            url = f"{sandbox.url}/v1/customers?limit=1"
            transport = HttpTransport()
            transport.send_once("GET", url, HEADERS, None)  # connect first
            started = time.process_time()
            for _ in range(count):
                transport.send_once("GET", url, HEADERS, None)
            ours = (time.process_time() - started) / count
            transport.close_connections()

            parts = urllib.parse.urlsplit(url)
            connection = http.client.HTTPConnection(parts.hostname, parts.port)
            started = time.process_time()
            for _ in range(count):
                connection.request("GET", f"{parts.path}?{parts.query}", headers=HEADERS)
                connection.getresponse().read()
            bare = (time.process_time() - started) / count
            connection.close()
        finally:
            sandbox.stop()
    print(
        json.dumps(
            {
                "requests": count,
                "transport_us_per_request": round(ours * 1e6),
                "http_client_us_per_request": round(bare * 1e6),
            }
        )
    )


if __name__ == "__main__":
    main()
