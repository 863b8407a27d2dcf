"""No usage lost, whatever the pipeline sends: every record billed, kept, or the run fails.

Each test runs the real CLI against the sandbox. A record counts as accounted for when it
is stored by the sandbox, in the dead-letter file, or not covered by any STATE of a run
that failed.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from tests.helpers import (
    DEFAULT_DEAD_LETTERS,
    RECENT,
    TARGET,
    Pipeline,
    dead_letters,
    position,
    run_target,
    singer,
    usage,
    wait_until,
)
from tests.platforms import CASES, DESTINATIONS_UNDER_TEST, USAGE_RULE_M3TER, config_for

BATCH_TAP = str(Path(__file__).with_name("batch_tap.py"))


def stored_notes(sandbox, destination: str) -> list[str]:
    category = CASES[destination].note_field
    return sorted(item[category]["note"] for item in sandbox.items(destination))


both = pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)  # every destination


# --- 1. dry runs write no STATE ------------------------------------------------------------


@both
@pytest.mark.parametrize("how", ["flag", "env"])
def test_dry_run_writes_no_state_and_says_would_send(sandbox, tmp_path, destination, how):
    config = config_for(destination, sandbox)
    lines = singer("usage", usage(250), key_properties=["id"], state={"bookmarks": {"usage": 250}})
    if how == "flag":
        result = run_target(tmp_path, config, lines, args=["--dry-run"])
    else:  # as `meltano run` passes it: TARGET_USAGE_BILLING_DRY_RUN=true
        result = run_target(
            tmp_path, config, lines, args=["--config", "ENV"], env={"TARGET_USAGE_BILLING_DRY_RUN": "true"}
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # no STATE at all: the next real run must see this usage
    assert sandbox.stats(destination)["requests"] == 0
    assert "would send 250" in result.stderr and "sent 250" not in result.stderr
    assert "STATE messages withheld 1" in result.stderr
    assert (tmp_path / "dry-run-requests.jsonl").exists()


# --- 2. the tap's STATE comes out unchanged -----------------------------------------------

STRANGE_STATE = (
    '{"bookmarks": {"usage": {"replication_key_value": 1700000000.123456789, "big": '
    '123456789012345678901234567890, "neg": -0.000001, "exp": 1e-7, "nested": [[1.5, [2.25]], {"x": 3.0}], '
    '"text": "caf\\u00e9 \\ud83d\\ude00 \\"quoted\\"", "none": null, "flag": true}}}'
)


@both
def test_state_with_fractions_big_integers_and_unicode_comes_out_unchanged(sandbox, tmp_path, destination):
    lines = singer("usage", usage(5), key_properties=["id"])
    lines.append('{"type": "STATE", "value": ' + STRANGE_STATE + "}")
    result = run_target(tmp_path, config_for(destination, sandbox), lines)
    assert result.returncode == 0, result.stderr
    emitted = result.stdout.splitlines()
    assert len(emitted) == 1
    assert json.loads(emitted[0], parse_float=Decimal) == json.loads(STRANGE_STATE, parse_float=Decimal)
    assert sandbox.stats(destination)["stored"] == 5


# --- 3. a stream no rule matches stops the run -------------------------------------------


@both
def test_unmatched_stream_stops_before_its_records_are_checkpointed(sandbox, tmp_path, destination):
    config = config_for(destination, sandbox)
    config["mappings"] = [{**config["mappings"][0], "stream": "api_usage"}]
    lines = singer("api_usage", usage(20), key_properties=["id"], state={"position": 20})
    # tap-postgres names streams <schema>-<table>
    lines += singer("public-api_usage", usage(30, start=20), key_properties=["id"], state={"position": 50})
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 2, result.stderr
    assert len(result.error_lines) == 1
    error = result.error_lines[0]
    assert "stream 'public-api_usage' matches no mapping rule" in error
    assert "patterns: 'api_usage'" in error and "closest: 'api_usage'" in error
    assert "Traceback" not in result.stderr
    assert result.states == [{"position": 20}]  # what came before is delivered and checkpointed
    assert sandbox.stats(destination)["stored"] == 20


@pytest.mark.parametrize("how", ["setting", "rule"])
def test_unmatched_stream_is_skipped_only_when_the_user_says_so(sandbox, tmp_path, how):
    never = {"stream": "never_*", "fields": {"meter": "'m'", "account": "'a'", "ts": "at"}}
    config = config_for("m3ter", sandbox, mappings=[USAGE_RULE_M3TER, never])
    if how == "setting":
        config["unmatched_streams"] = "skip"
    else:
        config["mappings"].append({"stream": "audit_log", "skip": True})
    lines = singer("usage", usage(10), key_properties=["id"]) + singer(
        "audit_log", [{"x": i} for i in range(5)], state={"position": 15}
    )
    result = run_target(tmp_path, config, lines)
    assert result.states == [{"position": 15}]  # what was billed is checkpointed either way
    assert sandbox.stats("m3ter")["stored"] == 10
    assert "stream audit_log: read 5, filtered 0, unmapped 5" in result.stderr
    assert "mappings[1] (stream 'never_*') matched no stream" in result.stderr
    if how == "setting":  # the user allows what matches nothing: a warning
        assert result.returncode == 0, result.stderr
        assert "it billed nothing (unmatched_streams is skip)" in result.stderr
    else:  # a mapping that fired on no stream is said as an unmatched stream is: exit 2
        assert result.returncode == 2, result.stderr
        (error,) = result.error_lines
        assert "mappings[1] (stream 'never_*') matched no stream (streams: 'audit_log', 'usage')" in error
        assert "so it billed nothing" in error and "Traceback" not in result.stderr


# --- 4. BATCH messages ---------------------------------------------------------------------


def batch_pipeline(tmp_path: Path, config: dict, count: int, compression: str) -> tuple[int, str, str]:
    """The real singer-sdk tap in tests/batch_tap.py, writing BATCH files, piped into the target."""
    files = tmp_path / "batch-files"
    files.mkdir(exist_ok=True)
    tap_config = {
        "count": count,
        "base_epoch": RECENT,
        "batch_config": {
            "encoding": {"format": "jsonl", "compression": compression},
            "storage": {"root": files.as_uri(), "prefix": "usage-"},
            "batch_size": 400,
        },
    }
    (tmp_path / "tap.json").write_text(json.dumps(tap_config))
    (tmp_path / "target.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_USAGE_BILLING_")}
    tap = subprocess.Popen(
        [sys.executable, BATCH_TAP, "--config", str(tmp_path / "tap.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    target = subprocess.run(
        [TARGET, "--config", str(tmp_path / "target.json")],
        stdin=tap.stdout,
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    tap.stdout.close()
    tap.wait(30)
    return target.returncode, target.stdout.decode(), target.stderr.decode()


@both
@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_batch_messages_from_a_real_sdk_tap_are_billed(sandbox, tmp_path, destination, compression):
    code, stdout, stderr = batch_pipeline(tmp_path, config_for(destination, sandbox), 1000, compression)
    assert code == 0, stderr
    assert stored_notes(sandbox, destination) == sorted(f"n{i}" for i in range(1000))
    assert sandbox.stats(destination)["conflicts"] == 0
    assert stdout.strip(), "the tap's STATE is released once the batch is acknowledged"
    assert "read 1000" in stderr


def write_batch_file(path: Path, rows: list[str], compress: bool) -> str:
    data = ("\n".join(rows) + "\n").encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path.as_uri()


def batch_message(urls: list[str], compression: str | None = "gzip", form: str = "jsonl") -> str:
    encoding = {"format": form, "compression": compression}
    return json.dumps({"type": "BATCH", "stream": "usage", "encoding": encoding, "manifest": urls})


def test_batch_rows_are_mapped_dead_lettered_and_checkpointed_like_records(sandbox, tmp_path):
    rows = [json.dumps(r) for r in usage(300)]
    rows[7] = json.dumps({**usage(1, start=7)[0], "tokens": "lots"})  # refused by the mapping
    first = write_batch_file(tmp_path / "a.jsonl.gz", rows[:150], compress=True)
    second = write_batch_file(tmp_path / "b.jsonl", rows[150:], compress=False)
    lines = singer("usage", [], key_properties=["id"])
    lines += [batch_message([first]), json.dumps({"type": "STATE", "value": {"position": 150}})]
    lines += [batch_message([second], compression=None)]
    lines += [json.dumps({"type": "STATE", "value": {"position": 300}})]
    config = config_for("m3ter", sandbox, max_rejected_ratio=1)
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("m3ter")["stored"] == 299
    assert result.states == [{"position": 150}, {"position": 300}]
    (dead,) = dead_letters(tmp_path)
    assert dead["record"]["id"] == 7 and dead["stage"] == "mapping"
    assert dead["batch_file"] == first and dead["batch_row"] == 8 and dead["line"] == 2


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (lambda good, bad: batch_message([good], form="parquet"), "BATCH encoding format='parquet'"),
        (lambda good, bad: batch_message([good], compression="zstd"), "compression='zstd' is not supported"),
        (lambda good, bad: batch_message([good + ".missing"]), "cannot read it"),
        (lambda good, bad: batch_message([good, bad], compression=None), "row 2: not valid JSON"),
        (lambda good, bad: batch_message([good.replace("rows", "cut")]), "(Compressed file ended"),
        (lambda good, bad: json.dumps({"type": "BATCH", "stream": "usage"}), "needs an encoding object"),
        (lambda good, bad: batch_message([good.replace("rows", "deep")]), "row 1: not valid JSON"),
    ],
)
def test_unusable_batch_stops_before_any_state_covers_it(sandbox, tmp_path, message, expected):
    good = write_batch_file(tmp_path / "rows.jsonl.gz", [json.dumps(r) for r in usage(10, start=100)], True)
    bad = write_batch_file(tmp_path / "bad.jsonl", [json.dumps(usage(1, start=200)[0]), "{not json"], False)
    (tmp_path / "cut.jsonl.gz").write_bytes((tmp_path / "rows.jsonl.gz").read_bytes()[:-12])  # truncated
    write_batch_file(tmp_path / "deep.jsonl.gz", ['{"x": ' + "[" * 5000 + "]" * 5000 + "}"], True)
    lines = singer("usage", usage(20), key_properties=["id"], state={"position": 20})
    lines += [message(good, bad), json.dumps({"type": "STATE", "value": {"position": 30}})]
    result = run_target(tmp_path, config_for("m3ter", sandbox), lines)
    assert result.returncode == 5, result.stderr
    assert len(result.error_lines) == 1 and expected in result.error_lines[0], result.stderr
    assert "line 23 (stream 'usage')" in result.error_lines[0]
    assert "Traceback" not in result.stderr
    assert result.states == [{"position": 20}]  # nothing after the bad BATCH is checkpointed
    assert sandbox.stats("m3ter")["stored"] >= 20


def test_batch_capability_is_declared():
    about = subprocess.run([TARGET, "--about", "--format", "json"], capture_output=True, check=True)
    assert "batch" in json.loads(about.stdout)["capabilities"]


# --- 5. rejected records are always kept ---------------------------------------------------


@both
def test_rejections_go_to_the_default_dead_letter_file(sandbox, tmp_path, destination):
    records = usage(40)
    records[3]["account"] = None
    records[9]["at"] = "not a time"
    config = config_for(destination, sandbox, max_rejected_ratio=1)
    assert "dead_letter_path" not in config
    result = run_target(tmp_path, config, singer("usage", records, key_properties=["id"], state={"p": 1}))
    assert result.returncode == 0, result.stderr
    dead = dead_letters(tmp_path)
    assert sorted(d["record"]["id"] for d in dead) == [3, 9]
    assert f"dead letters: 2 in {DEFAULT_DEAD_LETTERS}" in result.stderr
    assert result.states == [{"p": 1}]


def test_no_dead_letter_file_is_left_when_nothing_was_rejected(sandbox, tmp_path):
    result = run_target(tmp_path, config_for("m3ter", sandbox), singer("usage", usage(5)))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / DEFAULT_DEAD_LETTERS).exists()


def test_unwritable_dead_letter_path_stops_before_reading(sandbox, tmp_path):
    (tmp_path / "a-file").write_text("")
    config = config_for("m3ter", sandbox, dead_letter_path=str(tmp_path / "a-file" / "dead.jsonl"))
    result = run_target(tmp_path, config, singer("usage", usage(5)))
    assert result.returncode == 2
    assert len(result.error_lines) == 1 and "dead_letter_path: cannot write" in result.error_lines[0]
    assert sandbox.stats("m3ter")["requests"] == 0


# --- 6. two usage events, one id ----------------------------------------------------------


@both
def test_a_second_body_for_an_id_already_sent_is_a_conflict_not_a_silent_drop(sandbox, tmp_path, destination):
    records = usage(10)
    changed = {**records[4], "tokens": 999}  # same key, different usage: an updated row
    again = dict(records[6])  # the very same event once more: harmless
    lines = singer("usage", [*records, changed, again], key_properties=["id"], state={"p": 12})
    result = run_target(tmp_path, config_for(destination, sandbox, max_rejected_ratio=1), lines)
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats(destination)
    assert stats["stored"] == 10 and stats["items_received"] == 10  # the duplicate was not re-sent
    (dead,) = dead_letters(tmp_path)
    assert dead["stage"] == "conflict" and dead["line"] == 12 and dead["record"]["tokens"] == 999
    assert dead["sent_body_digest"] != dead["body_digest"]
    assert dead["id"] == dead["payload"][CASES[destination].id_field]
    assert "rejected 1, duplicates 1" in result.stderr
    assert result.states == [{"p": 12}]


@both
def test_null_and_empty_keys_do_not_share_a_derived_id(sandbox, tmp_path, destination):
    records = usage(6)
    for record in records[:3]:
        record["id"] = None
    for record in records[3:]:
        record["id"] = ""
    lines = singer("usage", records, key_properties=["id"])
    result = run_target(tmp_path, config_for(destination, sandbox), lines)
    assert result.returncode == 0, result.stderr
    assert stored_notes(sandbox, destination) == sorted(r["note"] for r in records)
    assert not (tmp_path / DEFAULT_DEAD_LETTERS).exists()


# --- 7. an idle tap does not hold usage back ----------------------------------------------


@both
def test_a_quiet_tap_does_not_hold_usage_or_state_back(sandbox, tmp_path, destination):
    config = config_for(destination, sandbox, state_checkpoint_seconds=1)
    # 60 records and a STATE, then nothing for 60 s: far from a full batch
    run = Pipeline(tmp_path, config, 1000, every=60, pause=60, base_epoch=RECENT)
    try:
        started = time.monotonic()
        wait_until(lambda: run.stdout_path.read_text().strip() != "", timeout=20)
        assert time.monotonic() - started < 15
        assert sandbox.stats(destination)["stored"] == 60
        assert position(run.states[-1]) == 60
    finally:
        run.tap.kill()
        run.kill()


# --- 8. checkpoints do not shrink batches -------------------------------------------------


@both
def test_state_after_every_record_with_checkpoint_zero_still_batches(sandbox, tmp_path, destination):
    lines = singer("usage", [], key_properties=["id"])
    for i, record in enumerate(usage(300)):
        lines.append(json.dumps({"type": "RECORD", "stream": "usage", "record": record}))
        lines.append(json.dumps({"type": "STATE", "value": {"position": i + 1}}))
    result = run_target(tmp_path, config_for(destination, sandbox, state_checkpoint_seconds=0), lines)
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats(destination)
    assert stats["stored"] == 300
    assert stats["requests"] == -(-300 // CASES[destination].max_items)  # full batches only
    assert result.states[-1] == {"position": 300}


# --- 9. the rejection limit's arithmetic --------------------------------------------------


def test_records_refused_by_the_api_count_once_in_the_ratio(sandbox, tmp_path):
    records = usage(4)
    records[1]["note"] = records[2]["note"] = "refuse-me"
    sandbox.faults(refuse_items_containing=["refuse-me"])
    config = config_for("m3ter", sandbox, max_rejected_ratio=0.4)
    result = run_target(tmp_path, config, singer("usage", records))
    assert result.returncode == 6, result.stderr
    assert "2 of 4 mappable records rejected (50.0%)" in result.error_lines[0]
    assert len(dead_letters(tmp_path)) == 2


def test_a_run_whose_every_record_is_refused_stops_at_the_limit_while_splitting(sandbox, tmp_path):
    sandbox.faults(refuse_items_containing=["refuse-me"])
    # every measurement carries the text the sandbox refuses
    result = run_target(
        tmp_path,
        config_for("m3ter", sandbox, max_rejected_records=10),
        singer("usage", [{**r, "note": "refuse-me"} for r in usage(5000)], state={"p": 1}),
    )
    assert result.returncode == 6, result.stderr
    assert "over max_rejected_records=10" in result.error_lines[0]
    # without the limit, splitting 5 batches of 1,000 down to single items is ~10,000 requests
    assert sandbox.stats("m3ter")["requests"] < 300
    assert result.states == []
