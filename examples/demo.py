"""Run the bundled examples end to end against the local sandbox (no credentials needed).

1. starts ``usage-billing-sandbox`` on a free loopback port (data in .demo/sandbox/),
2. loads examples/segment-events.singer.jsonl into the m3ter sandbox,
3. generates recent Segment events and loads them into the Metronome, Orb, Lago,
   OpenMeter and Stripe sandboxes (Metronome and Stripe refuse events older than 34 and
   35 days, so a fixed file would age out),
4. prints what the sandbox received for each and reads it back with ``--reconcile``
   (the run journal against each platform's read API), then stops it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from target_usage_billing.sandbox.launch import launch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
WORK = ROOT / ".demo"
BIN = Path(sys.executable).parent
URL_SETTINGS = (
    "m3ter_ingest_url",
    "m3ter_auth_url",
    "metronome_api_url",
    "orb_api_url",
    "lago_api_url",
    "openmeter_api_url",
    "stripe_api_url",
    "stripe_meter_events_url",
)
# the platforms fed the generated recent events: (title, example config, destination)
RECENT = [
    ("Segment events (segment preset) -> Metronome events", "metronome-segment.config.json", "metronome"),
    ("Segment events (segment preset) -> Orb events", "orb-segment.config.json", "orb"),
    ("Segment events (segment preset) -> Lago events", "lago-segment.config.json", "lago"),
    (
        "Segment events (segment preset) -> OpenMeter CloudEvents",
        "openmeter-segment.config.json",
        "openmeter",
    ),
    ("Segment events (segment preset) -> Stripe meter events", "stripe-segment.config.json", "stripe"),
]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return answer.read()


def run(
    title: str, config_name: str, input_path: Path, url: str, destination: str, days: list[str] | None = None
) -> None:
    config = json.loads((EXAMPLES / config_name).read_text())
    for key in URL_SETTINGS:
        if key in config:  # the example's port -> this sandbox's, path kept (/orb, ...)
            config[key] = url + urllib.parse.urlsplit(config[key]).path
    config["dead_letter_path"] = str(WORK / f"{destination}-dead-letters.jsonl")
    config_path = WORK / config_name
    config_path.write_text(json.dumps(config, indent=2))
    command = [str(BIN / "target-usage-billing"), "--config", str(config_path), "--input", str(input_path)]
    print(f"\n=== {title}")
    print(
        "$ target-usage-billing --config",
        config_path.relative_to(ROOT),
        "--input",
        input_path.relative_to(ROOT),
    )
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    for line in done.stderr.splitlines():
        if "| target-usage-billing " in line and ("Summary" in line or line.split("| ")[-1].startswith("  ")):
            print(line.split("| ", 3)[-1])
        elif "error:" in line:
            print(line)
    states = done.stdout.splitlines()
    print(f"STATE messages on stdout: {len(states)}; last: {states[-1] if states else 'none'}")
    if done.returncode != 0:
        sys.exit(f"demo: target-usage-billing exited with {done.returncode}")
    stats = json.loads(fetch(f"{url}/_sandbox/stats"))[destination]
    items = fetch(f"{url}/_sandbox/items/{destination}").splitlines()
    print(
        f"The {destination} sandbox accepted {stats['accepted']} items in {stats['requests']} requests "
        f"(largest: {stats['max_items_per_request']} items, {stats['max_body_bytes']} bytes; "
        f"duplicates {stats['duplicates']}, rejected requests {stats['rejected_requests']})."
    )
    if items:
        print("First item as stored:", items[0].decode())
    # what the platform kept, read back and compared with the run journal
    reconcile = [
        str(BIN / "target-usage-billing"),
        "--config",
        str(config_path),
        "--reconcile",
        *(days or []),
    ]
    print("$ target-usage-billing --config", config_path.relative_to(ROOT), "--reconcile", *(days or []))
    checked = subprocess.run(reconcile, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    report = checked.stdout.splitlines()
    for line in report[:1] + [line for line in report if line.startswith(("  checked", "  result"))]:
        print(line)
    print(f"  ({len(report) - 2} table rows; exit {checked.returncode})")
    if checked.returncode != 0:
        sys.exit(
            f"demo: --reconcile exited with {checked.returncode}:\n{checked.stdout}{checked.stderr[-2000:]}"
        )


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    # Orb's grace period as the Orb example sets it (the events span the last 3 days)
    grace = json.loads((EXAMPLES / "orb-segment.config.json").read_text())["orb_grace_period_hours"]
    sandbox = launch(WORK / "sandbox", "--orb-grace-period-hours", str(grace))
    url = sandbox.url
    print(f"Sandbox listening on {url} (stats: {url}/_sandbox/stats)")
    try:
        run(
            "Segment events -> m3ter measurements",
            "m3ter-segment.config.json",
            EXAMPLES / "segment-events.singer.jsonl",
            url,
            "m3ter",
            ["--since", "2026-11-18", "--until", "2026-11-20"],  # the bundled events' days
        )
        recent = WORK / "segment-events-recent.singer.jsonl"
        with open(recent, "w") as out:
            subprocess.run(
                [sys.executable, "-m", "target_usage_billing.sandbox.samples", "--count", "500"],
                stdout=out,
                check=True,
            )
        for title, config_name, destination in RECENT:
            run(title, config_name, recent, url, destination)
    finally:
        sandbox.stop()
    print(f"\nDone. Sandbox data, configs and dead letters are in {WORK.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
