"""What every destination promises alike: its example config dry-runs with no
credentials, and a refused credential stops the run before any input (exit 3), in one
line that names the setting and shows no secret."""

from __future__ import annotations

import json

import pytest

from target_usage_billing.destinations import DESTINATIONS
from target_usage_billing.sandbox import state as sandbox_state
from tests.helpers import EXAMPLES, run_target, singer, usage
from tests.platforms import CASES, DESTINATIONS_UNDER_TEST, example_config


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_every_example_config_dry_runs_the_bundled_events_without_credentials(tmp_path, destination):
    case = CASES[destination]
    path, sizes = case.example_requests
    config = json.loads((EXAMPLES / f"{destination}-segment.config.json").read_text())
    assert config.pop(case.secret_setting) == case.secret
    result = run_target(tmp_path, {**config, "dry_run": True}, EXAMPLES / "segment-events.singer.jsonl")
    assert result.returncode == 0, result.stderr
    written = [json.loads(line) for line in (tmp_path / "dry-run-requests.jsonl").read_text().splitlines()]
    assert [request["items"] for request in written] == list(sizes)
    assert {request["path"] for request in written} == {path}
    assert "rejected 0" in result.stderr and result.states == []  # a dry run withholds STATE


@pytest.mark.parametrize(
    ("destination", "setting", "message"),
    [
        (name, case.secret_setting, case.refused_key_message)
        for name, case in CASES.items()
        if case.refused_key_message
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
    assert set(accepted) == set(CASES)
    assert all(int(count) > 0 for count in accepted.values()), accepted
    assert done.stdout.count("rejected requests 0") == len(CASES)
    totals = re.findall(r"total: sent (\d+) .*, rejected (\d+),", done.stdout)
    assert len(totals) == len(CASES) and all(rejected == "0" for _, rejected in totals)
    # and each load read back from its platform and confirmed
    assert done.stdout.count("result: every item checked is confirmed") == len(CASES)


def test_every_destination_has_a_platform_case():
    """A new platform without its record in tests/platforms.py fails here by name, instead of
    being left out of every shared test family."""
    assert set(CASES) == set(DESTINATIONS) == set(sandbox_state.DESTINATIONS)
    assert all(case.destination is DESTINATIONS[name] for name, case in CASES.items())
