"""Real Meltano: the README's commands, then `meltano run tap-jsonl target-usage-billing`.

Meltano is installed in its own virtualenv by the test (it is not a dependency of the
target), cached in .cache/ between local runs. The project is this repository's
meltano.yml (for tap-jsonl) in a temporary directory; the loader is added with `meltano
add --plugin-type loader target-usage-billing --from-ref` from the generated plugin
definition (pip_url: this checkout) and configured with `meltano config set`; the
sandbox URL is given the way Meltano users give settings: environment variables.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.meltano_project import JOB, build_project, expected_uids, install_meltano, run_meltano

pytestmark = [pytest.mark.meltano, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def meltano() -> Path:
    return install_meltano()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, meltano: Path) -> Path:
    """This repository's meltano.yml without the loader, which is then added the way the
    README says: from the plugin definition, with `meltano config set`."""
    return build_project(tmp_path_factory.mktemp("meltano-project"), meltano)


def test_meltano_run_delivers_once_and_resumes_without_billing_twice(meltano, project, sandbox):
    env = {
        "TARGET_USAGE_BILLING_M3TER_INGEST_URL": sandbox.url,
        "TARGET_USAGE_BILLING_M3TER_AUTH_URL": sandbox.url,
    }
    first = run_meltano(meltano, project, "run", "tap-jsonl", "target-usage-billing", env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    items = sandbox.items("m3ter")
    assert {item["uid"] for item in items} == expected_uids()
    assert all(item["meter"] == "api_requests" and item["ts"].endswith("Z") for item in items)
    state = run_meltano(meltano, project, "state", "get", JOB)
    assert state.returncode == 0, state.stderr[-2000:]
    assert "segment_events" in state.stdout  # Meltano stored the STATE the target released

    second = run_meltano(meltano, project, "run", "tap-jsonl", "target-usage-billing", env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    stats = sandbox.stats("m3ter")
    assert stats["stored"] == len(expected_uids())  # nothing billed twice
    assert stats["conflicts"] == 0  # anything sent again was identical


def test_meltano_invoke_reconcile_reads_back_what_the_run_sent(meltano, project, sandbox):
    env = {
        "TARGET_USAGE_BILLING_M3TER_INGEST_URL": sandbox.url,
        "TARGET_USAGE_BILLING_M3TER_AUTH_URL": sandbox.url,
        # a journal of this run alone: tap-jsonl sends every row again on each run, which
        # the journal would count again (see "Delivery guarantees" in the README)
        "TARGET_USAGE_BILLING_JOURNAL_PATH": str(project / "reconcile-journal.sqlite"),
    }
    loaded = run_meltano(meltano, project, "run", "--force", "tap-jsonl", "target-usage-billing", env=env)
    assert loaded.returncode == 0, loaded.stderr[-4000:]

    # the bundled events are of 18 to 20 November 2026
    days = ["--since", "2026-11-18", "--until", "2026-11-20"]
    done = run_meltano(meltano, project, "invoke", "target-usage-billing:reconcile", *days, env=env)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every item checked is confirmed" in done.stdout
    assert "api_requests" in done.stdout  # the meter the example loads, per customer and day
    assert sandbox.stats("m3ter")["read_requests"] > 0


def test_meltano_invoke_about_lists_the_settings(meltano, project):
    done = run_meltano(meltano, project, "invoke", "target-usage-billing", "--about", "--format=json")
    assert done.returncode == 0, done.stderr[-2000:]
    about = json.loads(done.stdout[done.stdout.index("{") :])
    assert "mappings" in about["settings"]["properties"]


def test_meltano_select_list_and_a_forced_run_after_a_kill(meltano, project, sandbox):
    # the README's tap-postgres walkthrough uses these command forms
    selected = run_meltano(meltano, project, "select", "tap-jsonl", "segment_events", "*")
    assert selected.returncode == 0, selected.stderr[-2000:]
    listed = run_meltano(meltano, project, "select", "tap-jsonl", "--list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "segment_events" in listed.stdout
    env = {
        "TARGET_USAGE_BILLING_M3TER_INGEST_URL": sandbox.url,
        "TARGET_USAGE_BILLING_M3TER_AUTH_URL": sandbox.url,
    }
    forced = run_meltano(meltano, project, "run", "--force", "tap-jsonl", "target-usage-billing", env=env)
    assert forced.returncode == 0, forced.stderr[-4000:]
    dry = run_meltano(
        meltano,
        project,
        "run",
        "tap-jsonl",
        "target-usage-billing",
        env={**env, "TARGET_USAGE_BILLING_DRY_RUN": "true"},
    )
    assert dry.returncode == 0, dry.stderr[-4000:]
    assert "would send" in dry.stderr


def test_meltano_invoke_replay_sends_dead_letters_again(meltano, project, sandbox):
    # a track call the project's rule rejected once (here written as the target writes it)
    record = {
        "type": "track",
        "event": "API Request",
        "messageId": "replayed-by-meltano-1",
        "userId": "u1",
        "context": {"groupId": "acme"},
        "timestamp": "2026-11-19T10:00:00Z",
        "properties": {"endpoint": "/v1/x", "region": "eu", "requests": 1, "tokens": 0.125},
    }
    letter = {
        "run_id": "r",
        "stream": "segment_events",
        "line": 3,
        "keys": {"messageId": record["messageId"]},
    }
    letter.update(stage="api", reason="refused", record=record)
    (project / "to-replay.jsonl").write_text(json.dumps(letter) + "\n")
    env = {
        "TARGET_USAGE_BILLING_M3TER_INGEST_URL": sandbox.url,
        "TARGET_USAGE_BILLING_M3TER_AUTH_URL": sandbox.url,
        "TARGET_USAGE_BILLING_RUN_REPORT_PATH": str(project / "replay-report.json"),
    }
    done = run_meltano(meltano, project, "invoke", "target-usage-billing:replay", "to-replay.jsonl", env=env)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stage api, stream segment_events: replayed 1, sent 1, failed again 0" in done.stderr
    (item,) = sandbox.items("m3ter")
    assert item["uid"] == "replayed-by-meltano-1" and item["account"] == "acme"
    report = json.loads((project / "replay-report.json").read_text())
    assert report["mode"] == "replay" and report["exit_code"] == 0 and report["replay"]["sent"] == 1
