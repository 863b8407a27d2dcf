"""run_report_path: the JSON file an orchestrator reads after every run (real CLI runs
against the sandbox; failed, stopped and --reconcile runs too)."""

from __future__ import annotations

import json
import signal
import time

from tests.helpers import RECENT, Pipeline, dead_letters, run_target, singer, usage, wait_until
from tests.platforms import M3TER_SECRET, USAGE_RULE_M3TER, config_for

REPORT_KEYS = {
    "report_version",
    "mode",
    "exit_code",
    "meaning",
    "retryable",
    "error",
    "destination",
    "run_id",
    "started_at",
    "finished_at",
    "signal",
}


def read_report(path) -> dict:
    return json.loads(path.read_text())


def test_a_run_reports_its_figures_dead_letters_and_last_state(sandbox, tmp_path):
    rows = usage(30)
    rows[4]["tokens"] = "many"  # rejected by the mapping
    rows[9]["tokens"] = "lots"
    state_line = (
        '{"type": "STATE", "value": {"bookmarks": {"usage": {"fraction": 0.1000000000000000055511}}}}'
    )
    config = config_for(
        "m3ter", sandbox, run_report_path="report.json", batch_size_rows=10, max_rejected_ratio=0.5
    )
    result = run_target(tmp_path, config, [*singer("usage", rows, key_properties=["id"]), state_line])
    assert result.returncode == 0, result.stderr

    report = read_report(tmp_path / "report.json")
    assert report.keys() >= REPORT_KEYS
    assert report["mode"] == "run" and report["exit_code"] == 0 and report["meaning"] == "success"
    assert report["error"] is None and report["signal"] is None
    assert report["destination"] == "m3ter"
    (dead, _) = dead_letters(tmp_path)
    assert report["run_id"] == dead["run_id"]
    assert report["started_at"] <= report["finished_at"]
    usage_figures = report["streams"]["usage"]
    assert usage_figures["read"] == 30 and usage_figures["sent"] == 28 and usage_figures["rejected"] == 2
    assert usage_figures["rejected_by_stage"] == {"mapping": 2}
    assert usage_figures["requests"] == 3 and usage_figures["retries"] == 0
    assert usage_figures["mappings"]["mappings[0]"]["sent"] == 28
    assert report["totals"]["sent"] == sandbox.stats("m3ter")["stored"] == 28
    path = str(tmp_path / "target-usage-billing-dead-letters.jsonl")
    assert report["dead_letters"] == {"path": path, "count": 2}
    assert report["state"]["emitted"] == 1
    # the STATE exactly as it was emitted on stdout (decimals kept)
    assert report["state"]["last"] == result.states[-1]
    assert (
        '"last":{"bookmarks":{"usage":{"fraction":0.1000000000000000055511}}}'
        in (tmp_path / "report.json").read_text()
    )
    assert not list(tmp_path.glob(".report.json.*"))  # the temporary file was renamed


def test_a_failed_run_reports_its_own_exit_code_and_the_last_state_released(sandbox, tmp_path):
    lines = [*singer("usage", usage(5), state={"done": 5}), "{not json"]
    config = config_for("m3ter", sandbox, run_report_path="report.json")
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 5

    report = read_report(tmp_path / "report.json")
    assert report["exit_code"] == 5 and report["meaning"] == "bad input" and report["retryable"] is False
    assert report["error"].startswith("line 8: not valid JSON")
    assert report["error"] in result.stderr
    assert report["streams"]["usage"]["sent"] == 5
    assert report["state"] == {"emitted": 1, "withheld": 0, "last": {"done": 5}}


def test_refused_credentials_are_reported_without_the_secret(sandbox, tmp_path):
    wrong = "wrong-secret-value-12345"
    config = config_for("m3ter", sandbox, run_report_path="report.json", m3ter_api_secret=wrong)
    result = run_target(tmp_path, config, singer("usage", usage(3)))
    assert result.returncode == 3, result.stderr

    text = (tmp_path / "report.json").read_text()
    report = json.loads(text)
    assert report["exit_code"] == 3 and report["meaning"] == "credentials refused"
    assert "m3ter refused the credentials" in report["error"]
    assert wrong not in text and M3TER_SECRET not in text
    assert report["state"]["last"] is None


def test_invalid_settings_are_reported_too(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, run_report_path="report.json", max_rejected_ratio=3)
    result = run_target(tmp_path, config, singer("usage", usage(3)))
    assert result.returncode == 2

    report = read_report(tmp_path / "report.json")
    assert report["exit_code"] == 2 and report["meaning"] == "invalid settings"
    assert report["error"].startswith("max_rejected_ratio: must be")
    assert report["destination"] == "m3ter" and report["run_id"] is None
    assert sandbox.stats("m3ter")["requests"] == 0


def test_a_report_path_that_cannot_be_written_stops_the_run_at_start(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, run_report_path=str(tmp_path / "missing" / "report.json"))
    result = run_target(tmp_path, config, singer("usage", usage(3)))
    assert result.returncode == 2
    assert "run_report_path: cannot write" in result.stderr
    assert sandbox.stats("m3ter")["requests"] == 0


def test_a_stopped_run_names_the_signal(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, run_report_path=str(tmp_path / "report.json"), batch_size_rows=50)
    run = Pipeline(tmp_path, config, 100_000, every=100, pause=0.05, base_epoch=RECENT - 200_000)
    wait_until(lambda: sandbox.stats("m3ter")["stored"] >= 200)
    run.target.send_signal(signal.SIGTERM)
    code = run.wait()

    report = read_report(tmp_path / "report.json")
    assert report["exit_code"] == code == 0, run.stderr
    assert report["signal"] == "SIGTERM"
    assert report["state"]["last"] == run.states[-1]
    assert report["totals"]["sent"] == sandbox.stats("m3ter")["stored"]


def test_the_report_is_replaced_whole_by_the_next_run(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, run_report_path="report.json")
    first = run_target(tmp_path, config, singer("usage", usage(3)))
    assert first.returncode == 0
    run_id = read_report(tmp_path / "report.json")["run_id"]
    time.sleep(0.01)
    second = run_target(tmp_path, config, singer("usage", usage(4)))
    assert second.returncode == 0
    report = read_report(tmp_path / "report.json")
    assert report["run_id"] != run_id and report["totals"]["read"] == 4


def test_reconcile_reports_the_platform_result(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, run_report_path="report.json", mappings=[USAGE_RULE_M3TER])
    loaded = run_target(tmp_path, config, singer("usage", usage(20)))
    assert loaded.returncode == 0, loaded.stderr

    result = run_target(tmp_path, config, "", args=["--reconcile"])
    assert result.returncode == 0, result.stdout + result.stderr
    report = read_report(tmp_path / "report.json")
    assert report["mode"] == "reconcile" and report["exit_code"] == 0
    outcome = report["reconcile"]["m3ter"]
    assert outcome["confirmed"] is True and outcome["read_back"] == "totals"
    assert outcome["missing"] == 0 and outcome["totals_differ"] == 0 and outcome["buckets"] > 0

    sandbox.reset()  # the platform forgot everything: the journal's totals are short
    mismatch = run_target(tmp_path, config, "", args=["--reconcile"])
    assert mismatch.returncode == 8
    report = read_report(tmp_path / "report.json")
    assert report["exit_code"] == 8 and report["reconcile"]["m3ter"]["confirmed"] is False
    assert report["reconcile"]["m3ter"]["totals_differ"] > 0


def test_a_report_that_cannot_be_written_at_the_end_makes_a_successful_run_exit_9(sandbox, tmp_path):
    (tmp_path / "report.json").mkdir()  # passes the start-up check (its directory is writable)
    config = config_for("m3ter", sandbox, run_report_path="report.json")
    result = run_target(tmp_path, config, singer("usage", usage(3)))
    assert result.returncode == 9, result.stderr
    where = tmp_path / "report.json"
    assert result.error_lines == [
        f"target-usage-billing: error: run_report_path: cannot write '{where}': Is a directory"
    ]
    assert sandbox.stats("m3ter")["stored"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.json.")]


def test_a_second_signal_that_exits_at_once_still_leaves_a_report(sandbox, tmp_path):
    config = config_for(
        "m3ter",
        sandbox,
        run_report_path=str(tmp_path / "report.json"),
        batch_size_rows=50,
        shutdown_grace_seconds=60,
    )
    run = Pipeline(tmp_path, config, 100_000, every=100, pause=0.05, base_epoch=RECENT - 200_000)
    wait_until(lambda: sandbox.stats("m3ter")["stored"] >= 200)
    sandbox.faults(latency_ms=8000)  # requests in flight hold the graceful stop
    time.sleep(0.3)
    run.target.send_signal(signal.SIGTERM)
    time.sleep(3.5)  # past the 3 s in which a second signal counts as the same request
    run.target.send_signal(signal.SIGTERM)
    code = run.wait()
    sandbox.faults(latency_ms=0)

    assert code == 7, run.stderr
    report = read_report(tmp_path / "report.json")
    assert report["exit_code"] == 7 and report["signal"] == "SIGTERM" and report["retryable"] is True
    assert report["error"] == "second SIGTERM: exited without waiting"
    assert report["state"]["last"] == (run.states[-1] if run.states else None)


def test_a_dry_run_reports_the_state_it_withheld(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, run_report_path="report.json")
    result = run_target(tmp_path, config, singer("usage", usage(5), state={"done": 5}), args=["--dry-run"])
    assert result.returncode == 0, result.stderr
    report = read_report(tmp_path / "report.json")
    assert report["mode"] == "dry_run" and report["dry_run"] is True
    assert report["state"] == {"emitted": 0, "withheld": 1, "last": None}
    assert report["totals"]["sent"] == 5 and report["journal"] is None
    assert sandbox.stats("m3ter")["requests"] == 0
