"""--log-format json / log_format: json: the real CLI against the sandbox, every stderr
line parsed as one JSON object (the singer-sdk's structured format), the summary one
event whose figures are fields, no secret anywhere."""

from __future__ import annotations

import json

from tests.helpers import run_target, singer, usage
from tests.platforms import M3TER_SECRET, config_for


def events(stderr: str) -> list[dict]:
    found = []
    for line in stderr.splitlines():
        event = json.loads(line)  # fails the test on any line that is not JSON
        assert isinstance(event, dict), line
        assert {"ts", "level", "logger_name", "message"} <= event.keys(), line
        found.append(event)
    return found


def test_every_line_is_json_and_the_summary_is_one_event_of_figures(sandbox, tmp_path):
    rows = usage(40)
    rows[3]["tokens"] = "many"
    sandbox.faults({"kind": "503", "count": 1})
    config = config_for(
        "m3ter", sandbox, batch_size_rows=10, max_rejected_ratio=0.5, progress_interval_seconds=0.01
    )
    result = run_target(
        tmp_path, config, singer("usage", rows, state={"done": 40}), args=["--log-format", "json"]
    )
    assert result.returncode == 0, result.stderr

    logged = events(result.stderr)
    assert result.states == [{"done": 40}]  # stdout keeps the STATE, nothing else
    summaries = [e for e in logged if e["extra"].get("event") == "summary"]
    assert len(summaries) == 1
    summary = summaries[0]["extra"]["summary"]
    assert summary["destination"] == "m3ter"
    figures = summary["streams"]["usage"]
    assert figures["read"] == 40 and figures["rejected"] == 1 and figures["retries"] == 1
    assert figures["sent"] == sandbox.stats("m3ter")["stored"] == 39
    assert summary["dead_letters"]["count"] == 1 and summary["state"]["emitted"] == 1
    assert summaries[0]["message"].startswith("Summary for m3ter")
    warnings = [e for e in logged if e["level"] == "warning"]
    assert any("Rejected a record of stream 'usage'" in e["message"] for e in warnings)
    metrics = [e["extra"]["metric_info"] for e in logged if "metric_info" in e["extra"]]
    assert {"metric": "usage_billing.sent", "value": 39}.items() <= next(
        m for m in metrics if m["metric"] == "usage_billing.sent"
    ).items()
    assert M3TER_SECRET not in result.stderr


def test_a_failure_is_one_json_error_event_with_its_exit_code(sandbox, tmp_path):
    lines = [*singer("usage", usage(5)), "{broken"]
    config = config_for("m3ter", sandbox, log_format="json")  # the setting, not the option
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 5

    logged = events(result.stderr)
    errors = [e for e in logged if e["level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["message"].startswith("line 7: not valid JSON")
    assert errors[0]["extra"]["exit_code"] == 5
    assert sandbox.stats("m3ter")["stored"] == 5


def test_refused_credentials_from_environment_settings_leave_no_secret(sandbox, tmp_path):
    wrong = "wrong-secret-for-json-logs"
    config = config_for("m3ter", sandbox)
    del config["m3ter_api_secret"]
    env = {"TARGET_USAGE_BILLING_LOG_FORMAT": "json", "TARGET_USAGE_BILLING_M3TER_API_SECRET": wrong}
    result = run_target(tmp_path, config, singer("usage", usage(2)), args=["--config", "ENV"], env=env)
    assert result.returncode == 3, result.stderr

    logged = events(result.stderr)
    assert [e["extra"]["exit_code"] for e in logged if e["level"] == "error"] == [3]
    assert wrong not in result.stderr
