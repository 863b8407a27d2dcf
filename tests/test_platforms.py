"""What every destination promises alike: its example config dry-runs with no
credentials, and a refused credential stops the run before any input (exit 3), in one
line that names the setting and shows no secret."""

from __future__ import annotations

import json

import pytest

from tests.conftest import EXAMPLES, SECRETS, example_config, run_target, singer, usage

# per destination: (the key a dry run does without, request path, events per request)
EXAMPLES_DRY_RUN = {
    "m3ter": ("m3ter_api_secret", "/organizations/demo-org/measurements", [300]),
    "metronome": ("metronome_api_token", "/v1/ingest", [100, 100, 100, 100]),
    "orb": ("orb_api_key", "/v1/ingest", [400]),
    "lago": ("lago_api_key", "/api/v1/events/batch", [100, 100, 100, 100]),
    "openmeter": ("openmeter_api_token", "/api/v1/events", [400]),
    "stripe": ("stripe_api_key", "/v2/billing/meter_event_stream", [100, 100, 100]),
}


@pytest.mark.parametrize("destination", list(EXAMPLES_DRY_RUN))
def test_every_example_config_dry_runs_the_bundled_events_without_credentials(tmp_path, destination):
    secret, path, sizes = EXAMPLES_DRY_RUN[destination]
    config = json.loads((EXAMPLES / f"{destination}-segment.config.json").read_text())
    assert config.pop(secret) == SECRETS[destination]
    result = run_target(tmp_path, {**config, "dry_run": True}, EXAMPLES / "segment-events.singer.jsonl")
    assert result.returncode == 0, result.stderr
    written = [json.loads(line) for line in (tmp_path / "dry-run-requests.jsonl").read_text().splitlines()]
    assert [request["items"] for request in written] == sizes
    assert {request["path"] for request in written} == {path}
    assert "rejected 0" in result.stderr and result.states == []  # a dry run withholds STATE


@pytest.mark.parametrize(
    ("destination", "setting", "message"),
    [
        ("orb", "orb_api_key", "Orb refused the API key (401 from GET /orb/v1/customers): check orb_api_key"),
        (
            "lago",
            "lago_api_key",
            "Lago refused the API key (401 from GET /lago/api/v1/customers): check lago_api_key",
        ),
        (
            "openmeter",
            "openmeter_api_token",
            "OpenMeter refused the API token (401 from GET /openmeter/api/v1/meters): "
            "check openmeter_api_token",
        ),
        (
            "stripe",
            "stripe_api_key",
            "Stripe refused the secret key (401 from POST /v2/billing/meter_event_session): "
            "check stripe_api_key",
        ),
    ],
)
def test_a_refused_key_is_exit_3_before_any_input(sandbox, tmp_path, destination, setting, message):
    config = example_config(destination, sandbox, **{setting: "wrong-key-123"})
    result = run_target(tmp_path, config, singer("usage", usage(2)))
    assert result.returncode == 3
    (line,) = result.error_lines
    assert line.endswith(message)
    assert "wrong-key-123" not in result.stderr
    assert sandbox.stats(destination)["requests"] == 0  # stopped before any ingest request


def test_make_demo_loads_the_examples_into_all_six_sandboxes():
    """`make demo` (examples/demo.py), as a newcomer runs it: every platform gets usage."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
        cwd=root,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    accepted = dict(re.findall(r"The (\w+) sandbox accepted (\d+) items", done.stdout))
    assert set(accepted) == set(EXAMPLES_DRY_RUN)
    assert all(int(count) > 0 for count in accepted.values()), accepted
    assert done.stdout.count("rejected requests 0") == len(EXAMPLES_DRY_RUN)
    totals = re.findall(r"total: sent (\d+) .*, rejected (\d+),", done.stdout)
    assert len(totals) == len(EXAMPLES_DRY_RUN) and all(rejected == "0" for _, rejected in totals)
    # and each load read back from its platform and confirmed
    assert done.stdout.count("result: every item checked is confirmed") == len(EXAMPLES_DRY_RUN)
