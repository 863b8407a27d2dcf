"""What the target tells its operator: progress, summary, METRIC lines, dry run."""

from __future__ import annotations

import json
import re

from tests.helpers import EXAMPLES, Pipeline, run_target, singer
from tests.platforms import USAGE_RULE_M3TER, crash_config, m3ter_config, metronome_config

EXAMPLE = EXAMPLES / "segment-events.singer.jsonl"


def test_progress_lines_on_long_runs(sandbox, tmp_path):
    config = crash_config(sandbox, progress_interval_seconds=0.2)
    run = Pipeline(tmp_path, config, 3000, every=50, pause=0.05)  # about 3 s of input
    assert run.wait() == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "progress: read" in line]
    assert len(lines) >= 2
    pattern = (
        r"progress: read \d+, mapped \d+, sent \d+, rejected \d+, requests \d+, retries \d+, "
        r"[\d,]+ records/s, in flight \d+"
    )
    assert all(re.search(pattern, line) for line in lines)


def test_summary_and_metric_lines(sandbox, tmp_path):
    records = [
        {"id": i, "account": "a", "at": 1795184122 + i, "tokens": "bad" if i % 10 == 0 else i, "note": "n"}
        for i in range(100)
    ]
    lines = singer("usage", records) + singer("other", [{"x": 1}])[0:2]
    rule = {**USAGE_RULE_M3TER, "filter": "id < `90`"}
    sandbox.faults({"kind": "503", "count": 1})
    config = m3ter_config(sandbox, mappings=[rule], max_rejected_ratio=1, unmatched_streams="skip")
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 0, result.stderr
    summary = [
        line.split("| ", 3)[-1] for line in result.stderr.splitlines() if "| target-usage-billing " in line
    ]
    usage_line = "  stream usage: read 100, filtered 10, unmapped 0, sent 81 measurements, rejected 9, "
    assert usage_line + "requests 1, retries 1" in summary
    assert (
        "    rejected 9 x mapping: field 'measure.tokens' (expression 'tokens'): expected a number" in summary
    )
    other_line = "  stream other: read 1, filtered 0, unmapped 1, sent 0 measurements, rejected 0, "
    assert other_line + "requests 0, retries 0" in summary
    metrics = [
        json.loads(line.split("METRIC: ", 1)[1])
        for line in result.stderr.splitlines()
        if "METRIC: " in line and "usage_billing" in line
    ]
    by_name = {(m["metric"], m["tags"]["stream"]): m["value"] for m in metrics}
    assert by_name[("usage_billing.sent", "usage")] == 81
    assert by_name[("usage_billing.rejected", "usage")] == 9
    assert by_name[("usage_billing.retries", "usage")] == 1
    assert by_name[("usage_billing.unmapped", "other")] == 1


def test_dry_run_writes_the_exact_bodies_without_credentials_or_sending(sandbox, tmp_path):
    # first the real thing, to compare with
    real = run_target(tmp_path, m3ter_config(sandbox), EXAMPLE)
    assert real.returncode == 0, real.stderr
    sent = sorted(sandbox.raw_items("m3ter"))
    sandbox.reset()
    config = m3ter_config(sandbox, dead_letter_path="dead.jsonl")
    for secret in ("m3ter_access_key_id", "m3ter_api_secret"):
        config.pop(secret)
    dry = run_target(tmp_path, config, EXAMPLE, args=["--dry-run"])
    assert dry.returncode == 0, dry.stderr
    assert sandbox.stats("m3ter")["requests"] == 0 and sandbox.stats("m3ter")["token_requests"] == 0
    requests_ = [json.loads(line) for line in (tmp_path / "dry-run-requests.jsonl").read_text().splitlines()]
    assert all(r["destination"] == "m3ter" and r["method"] == "POST" for r in requests_)
    assert {r["path"] for r in requests_} == {"/organizations/demo-org/measurements"}
    # byte for byte what the real run sent
    previewed = sorted(
        json.dumps(item, separators=(",", ":")).encode()
        for r in requests_
        for item in r["body"]["measurements"]
    )
    assert len(previewed) == len(sent)
    assert [json.loads(a) for a in previewed] == [json.loads(b) for b in sent]
    assert "dry run: nothing was sent" in dry.stderr


def test_dry_run_still_reports_rejections(sandbox, tmp_path):
    records = [{"id": i, "customer": "c" if i else "", "at": "2026-11-20T10:00:00Z"} for i in range(5)]
    config = metronome_config(
        sandbox,
        dry_run=True,
        dead_letter_path="dead.jsonl",
        max_rejected_ratio=1,
        mappings=[
            {
                "stream": "usage",
                "fields": {
                    "transaction_id": "to_string(id)",
                    "customer_id": "customer",
                    "event_type": "'e'",
                    "timestamp": "at",
                },
            }
        ],
    )
    config.pop("metronome_api_token")
    result = run_target(tmp_path, config, singer("usage", records))
    assert result.returncode == 0, result.stderr
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert [d["record"]["id"] for d in dead] == [0]
    body = json.loads((tmp_path / "dry-run-requests.jsonl").read_text())["body"]
    assert sorted(event["transaction_id"] for event in body) == ["1", "2", "3", "4"]


def test_debug_logging_shows_each_rule_s_generated_code_under_its_file_name(sandbox, tmp_path):
    second = {**USAGE_RULE_M3TER, "name": "again", "fields": {**USAGE_RULE_M3TER["fields"], "meter": "'b'"}}
    config = m3ter_config(sandbox, dry_run=True, mappings=[USAGE_RULE_M3TER, second])
    records = [{"id": 1, "account": "acme", "at": "2026-11-20T10:00:00Z", "tokens": 3, "note": "n"}]
    result = run_target(tmp_path, config, singer("usage", records), args=["--log-level", "DEBUG"])
    assert result.returncode == 0, result.stderr
    assert "mappings[0]: generated code <mapping rule 0>:\n" in result.stderr
    assert "again: generated code <mapping rule 1>:\n" in result.stderr
    assert "def apply(record, stream, key_properties=()):" in result.stderr
    assert "Stream 'usage' (fan-out): generated code <stream mappings 0, 1>:\n" in result.stderr
    assert "def apply_all(record, stream, key_properties=()):" in result.stderr
