"""Real Meltano: the README's commands, then `meltano run tap-jsonl target-usage-billing`.

Meltano is installed in its own virtualenv by the test (it is not a dependency of the
target), cached in .cache/ between local runs. The project is this repository's
meltano.yml (for tap-jsonl) in a temporary directory; the loader is added with `meltano
add --plugin-type loader target-usage-billing --from-ref` from the generated plugin
definition (pip_url: this checkout) and configured with `meltano config set`; the
sandbox URL is given the way Meltano users give settings: environment variables.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from tests.helpers import ROOT
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


# --- operating it: two destinations, jobs and schedules, a failure an orchestrator reads ---


def recent_events(path: Path) -> set[str]:
    """The bundled events moved to the last hours (reconcile's default window is the last
    7 days); the ids of those the project's rule maps."""
    records = [
        json.loads(line) for line in (ROOT / "examples" / "segment-events.jsonl").read_text().splitlines()
    ]
    stamps = [dt.datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")) for r in records]
    shift = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2) - max(stamps)
    with path.open("w") as out:
        for record, stamp in zip(records, stamps):
            record["timestamp"] = (stamp + shift).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            out.write(json.dumps(record) + "\n")
    return expected_uids()


LAGO_RULE = {
    "stream": "segment_events",
    "filter": "type == 'track' && event == 'API Request'",
    "fields": {
        "transaction_id": "messageId",
        "code": "'api_requests'",
        "external_subscription_id": "context.groupId",
        "timestamp": "timestamp",
        "properties": {"requests": "properties.requests", "tokens": "properties.tokens"},
    },
}


def test_two_destinations_in_one_project_through_inherit_from(meltano, project, sandbox):
    added = run_meltano(
        meltano,
        project,
        "add",
        "--plugin-type",
        "loader",
        "target-usage-billing--lago",
        "--inherit-from",
        "target-usage-billing",
    )
    assert added.returncode == 0, added.stderr[-3000:]
    lago = project / "lago"
    settings = {
        "destination": "lago",
        "lago_api_key": "sandbox-lago-key",
        "lago_api_url": f"{sandbox.url}/lago",
        "mappings": json.dumps([LAGO_RULE]),
        # its own files: two loaders sharing one would mix their dead letters and journal
        "dead_letter_path": str(lago / "dead-letters.jsonl"),
        "journal_path": str(lago / "journal.sqlite"),
        "run_report_path": str(lago / "run-report.json"),
    }
    for name, value in settings.items():
        done = run_meltano(meltano, project, "config", "set", "target-usage-billing--lago", name, value)
        assert done.returncode == 0, done.stderr[-2000:]
    lago.mkdir()
    env = {
        "TARGET_USAGE_BILLING_M3TER_INGEST_URL": sandbox.url,
        "TARGET_USAGE_BILLING_M3TER_AUTH_URL": sandbox.url,
    }
    done = run_meltano(
        meltano,
        project,
        "run",
        "--force",
        "tap-jsonl",
        "target-usage-billing",
        "tap-jsonl",
        "target-usage-billing--lago",
        env=env,
    )

    assert done.returncode == 0, done.stderr[-4000:]
    assert {item["uid"] for item in sandbox.items("m3ter")} == expected_uids()
    lago_items = sandbox.items("lago")
    assert {item["transaction_id"] for item in lago_items} == expected_uids()
    assert all(item["code"] == "api_requests" for item in lago_items)
    report = json.loads((lago / "run-report.json").read_text())
    assert report["destination"] == "lago" and report["exit_code"] == 0
    assert report["dead_letters"]["path"] == str(lago / "dead-letters.jsonl")
    assert report["journal"]["where"].endswith(str(lago / "journal.sqlite"))
    assert report["journal"]["acknowledged_items"] == len(expected_uids())
    # each loader has its own STATE in Meltano's store
    for state_id in (JOB, "dev:tap-jsonl-to-target-usage-billing--lago"):
        state = run_meltano(meltano, project, "state", "get", state_id)
        assert state.returncode == 0, state.stderr[-2000:]
        assert "segment_events" in state.stdout, state_id
    # TARGET_USAGE_BILLING_* variables set the parent: the inherited loader takes from it
    # what it does not set itself; TARGET_USAGE_BILLING__LAGO_* set the inherited one alone
    env = {
        "TARGET_USAGE_BILLING_DRY_RUN_PATH": "/shared/dry-run.jsonl",
        "TARGET_USAGE_BILLING_DEAD_LETTER_PATH": "/shared/dead-letters.jsonl",
        "TARGET_USAGE_BILLING__LAGO_JOURNAL_SAMPLE_RATE": "0.5",
    }
    seen = run_meltano(meltano, project, "config", "list", "target-usage-billing--lago", env=env)
    assert seen.returncode == 0, seen.stderr[-2000:]
    lines = {line.split(" ", 1)[0]: line for line in seen.stdout.splitlines() if " current value: " in line}
    assert "'/shared/dry-run.jsonl' (inherited from 'target-usage-billing')" in lines["dry_run_path"]
    assert str(lago / "dead-letters.jsonl") in lines["dead_letter_path"]  # its own wins
    assert "0.5" in lines["journal_sample_rate"]
    seen = run_meltano(meltano, project, "config", "list", "target-usage-billing", env=env)
    assert "/shared/dead-letters.jsonl" in seen.stdout and "0.5" not in seen.stdout
    parent = run_meltano(meltano, project, "config", "list", "target-usage-billing")
    assert parent.returncode == 0 and "destination" in parent.stdout
    assert "m3ter" in parent.stdout.split("destination", 1)[1].splitlines()[0]  # the parent kept its own


def test_a_job_scheduled_daily_then_reconcile(meltano, project, sandbox):
    uids = recent_events(project / "recent-events.jsonl")
    # Meltano 4.4.1 runs a plugin command in a job only for utilities and the like, not a
    # loader's: reconcile is a step of its own (`meltano invoke`), after the job
    refused = run_meltano(
        meltano,
        project,
        "job",
        "add",
        "load-and-reconcile",
        "--tasks",
        "[tap-jsonl target-usage-billing, target-usage-billing:reconcile]",
    )
    assert refused.returncode == 1
    assert "Unknown command type or bad block sequence at index 1" in refused.stderr
    added = run_meltano(
        meltano, project, "job", "add", "daily-usage", "--tasks", "[tap-jsonl target-usage-billing]"
    )
    assert added.returncode == 0, added.stderr[-3000:]
    scheduled = run_meltano(
        meltano,
        project,
        "schedule",
        "add",
        "daily-usage-load",
        "--job",
        "daily-usage",
        "--interval",
        "@daily",
    )
    assert scheduled.returncode == 0, scheduled.stderr[-3000:]
    listed = run_meltano(meltano, project, "schedule", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr[-3000:]
    schedules = json.loads(listed.stdout[listed.stdout.index("{") :])
    (schedule,) = [s for s in schedules["schedules"]["job"] if s["name"] == "daily-usage-load"]
    assert schedule["interval"] == "@daily" and schedule["cron_interval"] == "0 0 * * *"
    assert schedule["job"] == {"name": "daily-usage", "tasks": ["tap-jsonl target-usage-billing"]}
    env = {
        "TARGET_USAGE_BILLING_M3TER_INGEST_URL": sandbox.url,
        "TARGET_USAGE_BILLING_M3TER_AUTH_URL": sandbox.url,
        "TARGET_USAGE_BILLING_JOURNAL_PATH": str(project / "job-journal.sqlite"),
        "TAP_JSONL_PATH": str(project / "recent-events.jsonl"),
    }

    done = run_meltano(meltano, project, "run", "daily-usage", env=env)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {item["uid"] for item in sandbox.items("m3ter")} == uids
    # the default window, the last 7 days, holds the run's usage
    checked = run_meltano(meltano, project, "invoke", "target-usage-billing:reconcile", env=env)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    assert "every item checked is confirmed" in checked.stdout
    assert sandbox.stats("m3ter")["read_requests"] > 0
    # what a crontab line runs: the schedule by its name (the job again: billed once)
    again = run_meltano(meltano, project, "schedule", "run", "daily-usage-load", env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    stats = sandbox.stats("m3ter")
    assert stats["stored"] == len(uids) and stats["conflicts"] == 0
    assert stats["items_received"] == 2 * len(uids)  # the schedule did run the job


def test_a_failing_meltano_run_leaves_the_targets_own_exit_code_in_the_run_report(meltano, project, sandbox):
    wrong = "wrong-secret-value-12345"
    report_path = project / "failed-run-report.json"
    env = {
        "TARGET_USAGE_BILLING_M3TER_INGEST_URL": sandbox.url,
        "TARGET_USAGE_BILLING_M3TER_AUTH_URL": sandbox.url,
        "TARGET_USAGE_BILLING_M3TER_API_SECRET": wrong,
        "TARGET_USAGE_BILLING_RUN_REPORT_PATH": str(report_path),
    }

    done = run_meltano(meltano, project, "run", "--force", "tap-jsonl", "target-usage-billing", env=env)

    assert done.returncode == 1, done.stderr[-4000:]  # Meltano's code for any failure
    text = report_path.read_text()
    report = json.loads(text)
    assert report["exit_code"] == 3 and report["meaning"] == "credentials refused"
    assert report["retryable"] is False  # a person must fix the secret: no retry
    assert "m3ter refused the credentials" in report["error"]
    assert report["state"]["emitted"] == 0 and report["state"]["last"] is None
    assert wrong not in text and wrong not in done.stdout + done.stderr
    assert sandbox.stats("m3ter")["stored"] == 0


def test_max_rejected_records_0_fails_the_meltano_run_and_the_report_says_why(meltano, project, sandbox):
    events = [
        json.loads(line)
        for line in (ROOT / "examples" / "segment-events.jsonl").read_text().splitlines()
        if '"API Request"' in line
    ][:6]
    del events[3]["context"]["groupId"]  # no customer to bill: rejected by the mapping
    (project / "one-bad-event.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    report_path = project / "alert-run-report.json"
    env = {
        "TARGET_USAGE_BILLING_M3TER_INGEST_URL": sandbox.url,
        "TARGET_USAGE_BILLING_M3TER_AUTH_URL": sandbox.url,
        "TARGET_USAGE_BILLING_MAX_REJECTED_RECORDS": "0",
        "TARGET_USAGE_BILLING_RUN_REPORT_PATH": str(report_path),
        "TARGET_USAGE_BILLING_JOURNAL_PATH": str(project / "alert-journal.sqlite"),
        "TAP_JSONL_PATH": str(project / "one-bad-event.jsonl"),
    }

    done = run_meltano(meltano, project, "run", "--force", "tap-jsonl", "target-usage-billing", env=env)

    assert done.returncode == 1, done.stderr[-4000:]
    assert "over max_rejected_records=0" in done.stderr  # the target's line, in Meltano's log
    report = json.loads(report_path.read_text())
    assert report["exit_code"] == 6 and report["meaning"] == "too many rejected records"
    assert report["retryable"] is False
    assert report["totals"]["rejected"] == 1 and report["dead_letters"]["count"] == 1
    assert report["totals"]["sent"] == 3  # the records before it were delivered
    assert sandbox.stats("m3ter")["stored"] == 3
