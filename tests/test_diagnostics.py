"""Mappings that say what is wrong: checked against the SCHEMA, the first records, and at start-up."""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers import EXAMPLES, run_target, singer
from tests.platforms import m3ter_config, metronome_config

RECENT = int(time.time()) - 3600
TABLE_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "customer_code": {"type": "string"},
        "occurred_at": {"type": "string", "format": "date-time"},
        "request_count": {"type": "integer"},
        "region": {"type": ["string", "null"]},
    },
}
ROWS = [
    {
        "id": i,
        "customer_code": f"c{i % 3}",
        "occurred_at": "2026-11-20T10:00:00Z",
        "request_count": i,
        "region": "eu",
    }
    for i in range(20)
]


def table_rule(**fields: object) -> dict:
    base = {
        "meter": "'api_requests'",
        "account": "customer_code",
        "ts": "occurred_at",
        "measure": {"requests": "request_count"},
    }
    return {"stream": "public-api_usage", "fields": {**base, **fields}}


def table_lines(state: dict | None = None) -> list[str]:
    return singer("public-api_usage", ROWS, schema=TABLE_SCHEMA, key_properties=["id"], state=state)


def test_a_required_field_reading_a_missing_property_stops_at_schema_time(sandbox, tmp_path):
    config = m3ter_config(sandbox, mappings=[table_rule(account="customer_id")])
    result = run_target(tmp_path, config, table_lines())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (error,) = result.error_lines
    assert "mappings[0] (stream 'public-api_usage'): field 'account' reads 'customer_id'" in error
    assert "has no property 'customer_id'; did you mean 'customer_code'?" in error
    assert sandbox.stats("m3ter")["requests"] == 0


def test_an_unquoted_text_literal_gets_the_quoting_hint(sandbox, tmp_path):
    config = m3ter_config(sandbox, mappings=[table_rule(meter="api_calls")])
    result = run_target(tmp_path, config, table_lines())
    assert result.returncode == 2, result.stderr
    assert "text literals need single quotes: 'api_calls'" in result.error_lines[0]


def test_an_optional_field_reading_a_missing_property_is_one_warning(sandbox, tmp_path):
    config = m3ter_config(sandbox, mappings=[table_rule(where={"region": "regoin"})])
    result = run_target(tmp_path, config, table_lines(state={"p": 20}))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("field 'where.region' reads 'regoin'") == 1
    assert "did you mean 'region'?" in result.stderr
    assert sandbox.stats("m3ter")["stored"] == 20
    assert result.states == [{"p": 20}]


def segment_lines(count: int) -> list[str]:
    lines = [
        line for line in (EXAMPLES / "segment-events.singer.jsonl").read_text().splitlines() if line.strip()
    ]
    return lines[: count + 1]


@pytest.mark.parametrize("destination", ["m3ter", "metronome"])
def test_a_required_field_always_empty_inside_an_open_object_stops_after_the_first_records(
    sandbox, tmp_path, destination
):
    # Segment's context has no declared properties: the schema cannot tell, the records can
    if destination == "m3ter":
        config = m3ter_config(sandbox)
        config["mappings"][0]["fields"]["account"] = "context.group_id"
        label = "account"
    else:
        config = metronome_config(sandbox, dry_run=True)
        config["mappings"] = [
            {"stream": "segment_events", "preset": "segment", "fields": {"customer_id": "context.group_id"}}
        ]
        label = "customer_id"
    result = run_target(tmp_path, {**config, "max_rejected_ratio": 1}, segment_lines(1000))
    assert result.returncode == 2, result.stderr
    (error,) = result.error_lines
    assert f"field '{label}' ('context.group_id') was empty in each of the first 100 records" in error
    assert "'context' has groupId, ip, library" in error and "did you mean 'context.groupId'?" in error
    assert "Traceback" not in result.stderr


def test_an_unknown_function_is_caught_before_any_input(sandbox, tmp_path):
    config = m3ter_config(sandbox, mappings=[table_rule(measure={"requests": "to_nubmer(request_count)"})])
    result = run_target(tmp_path, config, table_lines())
    assert result.returncode == 2
    assert "calls unknown function to_nubmer(); did you mean to_number()?" in result.error_lines[0]
    assert sandbox.stats("m3ter")["token_requests"] == 0  # stopped before the credential check


def test_a_compile_error_shows_where_the_parser_stopped(sandbox, tmp_path):
    config = m3ter_config(sandbox, mappings=[table_rule(account="customer_code.[")])
    result = run_target(tmp_path, config, table_lines())
    assert result.returncode == 2
    error = result.error_lines[0]
    assert "mappings[0].fields.account: expression 'customer_code.[' does not compile" in error
    assert "at column 16: customer_code.[\u2192" in error
    assert not error.rstrip().endswith(":")


def test_rejections_name_the_key_property_values(sandbox, tmp_path):
    rows = [dict(row) for row in ROWS]
    rows[5]["occurred_at"] = "yesterday-ish"
    config = m3ter_config(sandbox, mappings=[table_rule()], max_rejected_ratio=1)
    result = run_target(
        tmp_path, config, singer("public-api_usage", rows, schema=TABLE_SCHEMA, key_properties=["id"])
    )
    assert result.returncode == 0, result.stderr
    assert "Rejected a record of stream 'public-api_usage' (line 7, id=5, mapping)" in result.stderr
    (dead,) = [
        json.loads(line)
        for line in (tmp_path / "target-usage-billing-dead-letters.jsonl").read_text().splitlines()
    ]
    assert dead["keys"] == {"id": 5}


def test_the_dry_run_summary_shows_the_rule_and_the_first_payload(sandbox, tmp_path):
    config = m3ter_config(sandbox, mappings=[table_rule()], dry_run=True)
    result = run_target(tmp_path, config, table_lines())
    assert result.returncode == 0, result.stderr
    assert "    rule: mappings[0] (stream 'public-api_usage')" in result.stderr
    shown = next(line for line in result.stderr.splitlines() if "first payload: " in line)
    payload = json.loads(shown.split("first payload: ", 1)[1])
    assert payload["account"] == "c0" and payload["measure"] == {"requests": 0}
