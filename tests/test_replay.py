"""--replay DEAD_LETTERS.jsonl: dead letters sent again through the current mapping and
delivery (real CLI runs against the sandbox): same ids, exact decimals, harmless twice,
records rejected again in a new file, bad lines named."""

from __future__ import annotations

import json

import msgspec

from target_usage_billing.mapping.ids import derive_id
from tests.helpers import DEFAULT_DEAD_LETTERS, dead_letters, run_target, singer, usage
from tests.platforms import USAGE_RULE_M3TER, config_for

EXACT = "0.1000000000000000055511151231257827"
FIXED_RULE = {**USAGE_RULE_M3TER, "fields": {**USAGE_RULE_M3TER["fields"], "account": "account || customer"}}


def first_run(sandbox, tmp_path) -> list[str]:
    """20 usage rows, two of them (ids 3 and 8) without `account`: rejected by the mapping.
    Row 8's tokens are a decimal no float holds. The input lines."""
    rows = usage(20)
    for row in (rows[3], rows[8]):
        row["customer"] = row.pop("account")
    lines = singer("usage", rows, key_properties=["id"], state={"done": 20})
    lines[9] = lines[9].replace('"tokens": 8', f'"tokens": {EXACT}')
    config = config_for("m3ter", sandbox, max_rejected_ratio=0.5)
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("m3ter")["stored"] == 18
    return lines


def replay(tmp_path, config, *args: str):
    return run_target(tmp_path, config, "", args=["--replay", DEFAULT_DEAD_LETTERS, *args])


def test_a_replay_sends_with_the_original_ids_exact_decimals_and_twice_bills_once(sandbox, tmp_path):
    lines = first_run(sandbox, tmp_path)
    letters = dead_letters(tmp_path)
    assert [(d["stage"], d["keys"]) for d in letters] == [("mapping", {"id": 3}), ("mapping", {"id": 8})]
    original = (tmp_path / DEFAULT_DEAD_LETTERS).read_bytes()
    fixed = config_for("m3ter", sandbox, mappings=[FIXED_RULE], run_report_path="report.json")

    result = replay(tmp_path, fixed)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # no STATE: a replay moves no bookmark
    assert "stage mapping, stream usage: replayed 2, sent 2, failed again 0" in result.stderr
    assert sandbox.stats("m3ter")["stored"] == 20
    stored = {item["uid"]: item for item in sandbox.items("m3ter")}
    records = {r["id"]: r for r in (msgspec.json.decode(line.encode())["record"] for line in lines[1:-1])}
    for letter in letters:
        # the id the first run would have given it (and gives every record of the stream)
        assert letter["record_id"] == derive_id("usage", records[letter["keys"]["id"]], ["id"])
        assert stored[letter["record_id"]]["account"] == letter["record"]["customer"]
    assert all(derive_id("usage", record, ["id"]) in stored for record in records.values())
    assert any(f'"tokens":{EXACT}' in raw.decode() for raw in sandbox.raw_items("m3ter"))
    assert (tmp_path / DEFAULT_DEAD_LETTERS).read_bytes() == original  # left as it was
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "replay" and report["exit_code"] == 0
    assert report["replay"]["by_stage"]["mapping"]["usage"]["sent"] == 2
    assert report["replay"]["replayed"] == 2 and report["replay"]["failed_again"] == 0
    assert report["state"]["emitted"] == 0

    again = replay(tmp_path, fixed)

    assert again.returncode == 0, again.stderr
    stats = sandbox.stats("m3ter")
    assert stats["stored"] == 20 and stats["conflicts"] == 0  # de-duplicated: billed once


def test_records_rejected_again_go_to_a_new_file_and_exit_6(sandbox, tmp_path):
    first_run(sandbox, tmp_path)
    original = (tmp_path / DEFAULT_DEAD_LETTERS).read_bytes()

    result = replay(tmp_path, config_for("m3ter", sandbox))  # the mapping is not fixed

    assert result.returncode == 6, result.stderr
    (new,) = tmp_path.glob("target-usage-billing-dead-letters.replayed-*.jsonl")
    assert result.error_lines == [
        f"target-usage-billing: error: 2 of 2 replayed records were rejected again: see {new}"
    ]
    assert (tmp_path / DEFAULT_DEAD_LETTERS).read_bytes() == original  # nothing appended
    again = dead_letters(tmp_path, new.name)
    assert [d["replay"]["line"] for d in again] == [1, 2] == [d["line"] for d in again]
    assert [d["replay"]["input_line"] for d in again] == [5, 10]
    assert all(d["stage"] == "mapping" and d["replay"]["stage"] == "mapping" for d in again)
    assert sandbox.stats("m3ter")["stored"] == 18


def test_api_refusals_replayed_by_stage(sandbox, tmp_path):
    rows = usage(30)
    for i in (4, 17):
        rows[i]["note"] = "poison"
    rows[9]["tokens"] = "many"  # a mapping rejection, which --stage api leaves alone
    sandbox.faults(refuse_items_containing=["poison"])
    config = config_for("m3ter", sandbox, max_rejected_ratio=0.5, batch_size_rows=10)
    first = run_target(tmp_path, config, singer("usage", rows, key_properties=["id"]))
    assert first.returncode == 0, first.stderr
    assert sorted(d["stage"] for d in dead_letters(tmp_path)) == ["api", "api", "mapping"]
    assert sandbox.stats("m3ter")["stored"] == 27
    sandbox.faults(refuse_items_containing=[])  # the platform takes them now

    result = replay(tmp_path, config, "--stage", "api")

    assert result.returncode == 0, result.stderr
    assert "stage api, stream usage: replayed 2, sent 2, failed again 0" in result.stderr
    assert "not replayed: 1 of stage mapping: stage not selected (--stage)" in result.stderr
    assert sandbox.stats("m3ter")["stored"] == 29


def test_bad_lines_are_named_one_each_and_the_rest_is_replayed(sandbox, tmp_path):
    good = {
        "run_id": "r1",
        "stream": "usage",
        "line": 2,
        "keys": {"id": 1},
        "record_id": None,
        "stage": "api",
        "reason": "...",
        "record": usage(2)[1],
    }
    platform = {"run_id": "r2", "stream": "usage", "stage": "platform", "record": None, "id": "x"}
    (tmp_path / DEFAULT_DEAD_LETTERS).write_text(
        "\n".join([json.dumps(good), "{not json", '{"stage": "api"}', json.dumps(platform)]) + "\n"
    )

    result = replay(tmp_path, config_for("m3ter", sandbox), "--stage", "api,platform")

    assert result.returncode == 5, result.stderr
    bad = [line for line in result.stderr.splitlines() if "| ERROR" in line and ", line " in line]
    assert len(bad) == 2
    assert f"--replay {DEFAULT_DEAD_LETTERS}, line 2: not valid JSON" in bad[0]
    assert f"--replay {DEFAULT_DEAD_LETTERS}, line 3: not a dead letter" in bad[1] and "stream" in bad[1]
    assert "not replayed: 1 of stage platform: holds no record" in result.stderr
    assert sandbox.stats("m3ter")["stored"] == 1
    assert "1 line(s) could not be read" not in result.stderr
    assert result.error_lines == [
        f"target-usage-billing: error: --replay {DEFAULT_DEAD_LETTERS}: 2 line(s) could not be read "
        "(named above); every other dead letter selected was replayed"
    ]


def test_replay_settings_errors(sandbox, tmp_path):
    config = config_for("m3ter", sandbox)
    missing = run_target(tmp_path, config, "", args=["--replay", "nothing.jsonl"])
    assert missing.returncode == 2
    assert missing.error_lines == ["target-usage-billing: error: --replay nothing.jsonl: no such file"]
    (tmp_path / "dead.jsonl").write_text("")
    unknown = run_target(tmp_path, config, "", args=["--replay", "dead.jsonl", "--stage", "mapping,typo"])
    assert unknown.returncode == 2
    assert "--stage: unknown stage typo (stages: input, schema, mapping" in unknown.stderr
    alone = run_target(tmp_path, config, "", args=["--stage", "api"])
    assert alone.returncode == 2 and "--stage goes with --replay" in alone.stderr


def test_the_replayed_items_are_counted_in_the_journal_the_original_run_kept(sandbox, tmp_path):
    first_run(sandbox, tmp_path)
    fixed = config_for("m3ter", sandbox, mappings=[FIXED_RULE])
    assert replay(tmp_path, fixed).returncode == 0

    reconciled = run_target(tmp_path, fixed, "", args=["--reconcile"])

    # the journal beside the dead letters holds 18 + 2 measurements, as the platform does
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert "every item checked is confirmed" in reconciled.stdout


def test_a_record_one_of_several_mappings_rejected_is_billed_again_by_that_one_alone(sandbox, tmp_path):
    tokens = {"name": "tokens", **USAGE_RULE_M3TER}
    extra = {
        "name": "extra",
        "stream": "usage",
        "fields": {"meter": "'extra'", "account": "account", "ts": "at", "measure": {"x": "x"}},
    }
    rows = usage(10, x=1)
    rows[5]["x"] = "bad"
    config = config_for("m3ter", sandbox, mappings=[tokens, extra], max_rejected_ratio=0.5)
    first = run_target(tmp_path, config, singer("usage", rows, key_properties=["id"]))
    assert first.returncode == 0, first.stderr
    (letter,) = dead_letters(tmp_path)
    assert letter["mapping"] == "extra" and sandbox.stats("m3ter")["stored"] == 19
    fixed_extra = {**extra, "fields": {**extra["fields"], "measure": {"x": "tokens"}}}

    result = replay(tmp_path, config_for("m3ter", sandbox, mappings=[tokens, fixed_extra]))

    assert result.returncode == 0, result.stderr
    assert "stage mapping, stream usage: replayed 1, sent 1, failed again 0" in result.stderr
    stats = sandbox.stats("m3ter")
    assert stats["stored"] == 20 and stats["requests"] == 2  # one request each run
    meters = [item["meter"] for item in sandbox.items("m3ter")]
    assert meters.count("extra") == meters.count("tokens") == 10


def test_conflicts_are_replayed_only_when_asked(sandbox, tmp_path):
    base = {"run_id": "r", "stream": "usage", "keys": {"id": 1}, "reason": "...", "record": usage(2)[1]}
    (tmp_path / DEFAULT_DEAD_LETTERS).write_text(json.dumps({**base, "stage": "conflict"}) + "\n")
    config = config_for("m3ter", sandbox)

    default = replay(tmp_path, config)
    assert default.returncode == 0, default.stderr
    assert "not replayed: 1 of stage conflict: stage not selected (--stage)" in default.stderr
    assert sandbox.stats("m3ter")["stored"] == 0

    asked = replay(tmp_path, config, "--stage", "conflict")
    assert asked.returncode == 0, asked.stderr
    assert sandbox.stats("m3ter")["stored"] == 1


def test_with_json_logs_the_replay_summary_is_one_event_of_figures(sandbox, tmp_path):
    first_run(sandbox, tmp_path)
    fixed = config_for("m3ter", sandbox, mappings=[FIXED_RULE])

    result = replay(tmp_path, fixed, "--log-format", "json")

    assert result.returncode == 0, result.stderr
    logged = [json.loads(line) for line in result.stderr.splitlines()]
    (event,) = [e for e in logged if e["extra"].get("event") == "replay"]
    figures = event["extra"]["replay"]
    assert figures["replayed"] == figures["sent"] == 2 and figures["failed_again"] == 0
    assert figures["by_stage"]["mapping"]["usage"]["replayed"] == 2


def test_letters_whose_key_properties_differ_from_their_streams_first_are_not_replayed(sandbox, tmp_path):
    rows = usage(3)
    base = {"run_id": "r", "stream": "usage", "stage": "api", "reason": "..."}
    letters = [
        {**base, "keys": {"id": 0}, "record": rows[0]},
        {**base, "keys": {"id": 1, "account": "a1"}, "record": rows[1]},  # a tap with other keys
        {**base, "keys": {"id": 2}, "record": rows[2]},
    ]
    (tmp_path / DEFAULT_DEAD_LETTERS).write_text("\n".join(json.dumps(d) for d in letters) + "\n")

    result = replay(tmp_path, config_for("m3ter", sandbox))

    assert result.returncode == 0, result.stderr
    assert (
        f"--replay {DEFAULT_DEAD_LETTERS}, line 2: stream 'usage' has key properties ['id', 'account'] "
        "here and ['id'] in its first dead letter" in result.stderr
    )
    assert "stage api, stream usage: replayed 2, sent 2, failed again 0" in result.stderr
    assert {item["uid"] for item in sandbox.items("m3ter")} == {
        derive_id("usage", rows[0], ["id"]),
        derive_id("usage", rows[2], ["id"]),
    }


def test_max_rejected_records_still_stops_a_replay(sandbox, tmp_path):
    first_run(sandbox, tmp_path)

    result = replay(tmp_path, config_for("m3ter", sandbox, max_rejected_records=0))

    assert result.returncode == 6, result.stderr
    assert "1 records rejected, over max_rejected_records=0" in result.error_lines[0]


def _age_journal(directory, hours: float) -> None:
    """Everything the journal holds acknowledged ``hours`` earlier (as test_history does)."""
    import sqlite3

    with sqlite3.connect(directory / "target-usage-billing-journal.sqlite") as db:
        for table in ("journal_samples", "journal_tail_times"):
            db.execute(
                f"UPDATE {table} SET sent_at = strftime('%Y-%m-%dT%H:%M:%SZ', sent_at, ?)",
                (f"-{hours * 3600:.0f} seconds",),
            )


def test_a_replay_of_usage_stripe_acknowledged_over_24_hours_ago_is_refused(sandbox, tmp_path):
    rows = [{**row, "account": "cus_1"} for row in usage(5, start=100)]
    letters = [
        {"run_id": "r1", "stream": "usage", "line": i + 2, "keys": {"id": row["id"]}, "record_id": None}
        | {"stage": "api", "reason": "refused", "record": row}
        for i, row in enumerate(rows)
    ]
    (tmp_path / DEFAULT_DEAD_LETTERS).write_text("".join(json.dumps(letter) + "\n" for letter in letters))
    config = config_for("stripe", sandbox, journal_sample_rate=1, run_report_path="report.json")
    replayed = replay(tmp_path, config)
    assert replayed.returncode == 0, replayed.stderr
    assert sandbox.stats("stripe")["items_received"] == 5
    # later usage of the stream: the replayed ids are no longer its last batch
    later_rows = [{**row, "account": "cus_1"} for row in usage(3)]
    later = run_target(tmp_path, config, singer("usage", later_rows, key_properties=["id"]))
    assert later.returncode == 0, later.stderr
    _age_journal(tmp_path, 25)
    received = sandbox.stats("stripe")["items_received"]

    refused = replay(tmp_path, config)  # the same file again, a day later

    assert refused.returncode == 2, refused.stderr
    (error,) = refused.error_lines
    assert "stream 'usage'" in error and "acknowledged by Stripe at" in error
    assert "(24 hours): sent again, they would be billed twice" in error
    assert "allow_resend_beyond_dedup_window" in error
    assert sandbox.stats("stripe")["items_received"] == received  # nothing of it was sent
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "replay" and report["exit_code"] == 2 and report["retryable"] is False
    assert "acknowledged by Stripe at" in report["error"]

    forced = replay(tmp_path, {**config, "allow_resend_beyond_dedup_window": True})

    assert forced.returncode == 0, forced.stderr
    assert forced.stderr.count("sending anyway (allow_resend_beyond_dedup_window)") == 1
    assert "stage api, stream usage: replayed 5, sent 5, failed again 0" in forced.stderr
    assert sandbox.stats("stripe")["items_received"] == received + 5


def test_max_rejected_records_0_stops_a_normal_run_at_the_first_rejection(sandbox, tmp_path):
    # the alerting setting, in a normal run as in a replay (above): exit 6 at the first
    # rejection; what came before it is delivered and its STATE released, nothing after is read
    rows = usage(30)
    rows[20]["customer"] = rows[20].pop("account")  # rejected by the mapping
    lines = singer("usage", rows[:20], key_properties=["id"], state={"at": 20})
    lines += singer("usage", rows[20:], key_properties=["id"], state={"at": 30})[1:]
    config = config_for("m3ter", sandbox, max_rejected_records=0, run_report_path="report.json")

    result = run_target(tmp_path, config, lines)

    assert result.returncode == 6, result.stderr
    (error,) = result.error_lines
    assert "1 records rejected, over max_rejected_records=0" in error
    assert sandbox.stats("m3ter")["stored"] == 20
    assert result.states == [{"at": 20}]
    assert [(d["stage"], d["keys"]) for d in dead_letters(tmp_path)] == [("mapping", {"id": 20})]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exit_code"] == 6 and report["meaning"] == "too many rejected records"
    assert report["retryable"] is False
    assert report["totals"]["read"] == 21 and report["totals"]["rejected"] == 1
    assert report["totals"]["sent"] == 20
    assert report["dead_letters"]["count"] == 1 and report["state"]["last"] == {"at": 20}
