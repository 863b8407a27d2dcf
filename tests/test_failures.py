"""Every failure: one clear line, the documented exit code, bounded time and memory.

Hostile input, settings and API answers through the real CLI against the sandbox. Every
test also checks that no traceback reached the operator.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from target_usage_billing.http import Response
from target_usage_billing.retry import backoff_waits, retry_after_seconds, should_retry
from tests.helpers import (
    DEFAULT_DEAD_LETTERS,
    RECENT,
    TARGET,
    Pipeline,
    Result,
    dead_letters,
    run_target,
    singer,
    usage,
    wait_until,
)
from tests.platforms import CASES, DESTINATIONS_UNDER_TEST, USAGE_RULE_M3TER, config_for

both = pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)  # every destination
DEAD = DEFAULT_DEAD_LETTERS


def record_line(record_json: str) -> str:
    return '{"type": "RECORD", "stream": "usage", "record": ' + record_json + "}"


def clean(result) -> None:
    """What every failure owes the operator: no traceback, at most one error line."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.error_lines) <= 1, result.error_lines


# --- input that stops the run (exit 5, after delivering what came before) -----------------

STOPPING_LINES = {
    "invalid UTF-8": (
        b'{"type": "RECORD", "stream": "usage", "record": {"note": "a\xff\xfe"}}',
        "not valid UTF-8",
    ),
    "deep nesting": (
        b'{"type": "RECORD", "stream": "usage", "record": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
        "nested too deeply",
    ),
    "stream not a string": (b'{"type": "RECORD", "stream": 5, "record": {}}', "stream must be a string"),
    "key_properties not a list": (
        b'{"type": "SCHEMA", "stream": "usage", "schema": {"type": "object", "properties": {}}, '
        b'"key_properties": "id"}',
        "key_properties must be a list",
    ),
    "schema not an object": (
        b'{"type": "SCHEMA", "stream": "usage", "schema": [], "key_properties": []}',
        "schema must be a JSON object",
    ),
    "NaN outside a record": (b'{"type": "STATE", "value": NaN, "x": }', "not valid JSON"),
}


@both
@pytest.mark.parametrize("case", sorted(STOPPING_LINES))
def test_bad_line_stops_with_exit_5_after_delivering_what_came_before(sandbox, tmp_path, destination, case):
    bad, expected = STOPPING_LINES[case]
    lines = singer("usage", usage(30), key_properties=["id"], state={"position": 30})
    data = (
        ("\n".join(lines) + "\n").encode()
        + bad
        + b"\n"
        + ("\n".join(singer("usage", usage(5))[1:]) + "\n").encode()
    )
    (tmp_path / "input.jsonl").write_bytes(data)
    result = run_target(tmp_path, config_for(destination, sandbox), tmp_path / "input.jsonl")
    assert result.returncode == 5, result.stderr
    clean(result)
    assert expected in result.error_lines[0] and "line 33" in result.error_lines[0]
    assert sandbox.stats(destination)["stored"] == 30
    assert result.states == [{"position": 30}]


# --- input that is skipped or kept, and counted ------------------------------------------


def test_activate_version_for_an_unknown_stream_is_skipped_and_counted(sandbox, tmp_path):
    lines = singer("usage", usage(3), key_properties=["id"])
    lines.insert(2, json.dumps({"type": "ACTIVATE_VERSION", "stream": "ghost", "version": 1}))
    lines.append(json.dumps({"type": "ACTIVATE_VERSION", "stream": "usage", "version": 2}))
    result = run_target(tmp_path, config_for("m3ter", sandbox), lines)
    assert result.returncode == 0, result.stderr
    clean(result)
    assert "line 3: skipping ACTIVATE_VERSION message (stream 'ghost' has had no SCHEMA)" in result.stderr
    assert "messages skipped: ACTIVATE_VERSION x 2" in result.stderr
    assert sandbox.stats("m3ter")["stored"] == 3


@both
def test_records_that_are_not_objects_are_dead_lettered_and_counted(sandbox, tmp_path, destination):
    lines = singer("usage", usage(4), key_properties=["id"], state={"p": 1})
    lines[2:2] = [record_line("null"), record_line("[1, 2]"), record_line('"text"')]
    result = run_target(tmp_path, config_for(destination, sandbox, max_rejected_ratio=1), lines)
    assert result.returncode == 0, result.stderr
    clean(result)
    dead = dead_letters(tmp_path)
    assert [(d["stage"], d["line"], d["record"]) for d in dead] == [
        ("input", 3, None),
        ("input", 4, [1, 2]),
        ("input", 5, "text"),
    ]
    assert "rejected 3" in result.stderr and sandbox.stats(destination)["stored"] == 4
    assert result.states == [{"p": 1}]


@both
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_naming_the_field(sandbox, tmp_path, destination, literal):
    lines = singer("usage", usage(3), key_properties=["id"])
    lines.append(
        record_line(f'{{"id": 9, "account": "a", "at": {RECENT}, "tokens": {literal}, "note": "x"}}')
    )
    result = run_target(tmp_path, config_for(destination, sandbox, max_rejected_ratio=1), lines)
    assert result.returncode == 0, result.stderr
    clean(result)
    (dead,) = dead_letters(tmp_path)
    expected = {"m3ter": "measure.tokens", "openmeter": "data.tokens", "stripe": "payload.value"}
    assert dead["field"] == expected.get(destination, "properties.tokens")
    # a text field (Stripe's payload) says what it wanted, a number field why it refused
    assert ("expected a string" if destination == "stripe" else "finite number") in dead["reason"]
    assert sandbox.stats(destination)["stored"] == 3


def test_a_byte_order_mark_on_the_first_line_is_accepted(sandbox, tmp_path):
    text = "\n".join(singer("usage", usage(3), key_properties=["id"])) + "\n"
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    result = run_target(tmp_path, config_for("m3ter", sandbox), tmp_path / "bom.jsonl")
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("m3ter")["stored"] == 3


# --- resource bombs ---------------------------------------------------------------------


# Starts the target and reports its peak RSS: a small process of its own, because a
# forked child's peak-RSS figure starts from its parent's size (pytest holds the input).
_MEASURE = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
sys.stdout.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss * 1024}")
"""


def run_measured(tmp_path: Path, config: dict, feed: bytes | list[bytes]) -> tuple[int, str, int]:
    """Run the CLI with input fed through a pipe in pieces; (exit code, stderr, peak RSS bytes)."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_USAGE_BILLING_")}
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", _MEASURE, TARGET, "--config", str(tmp_path / "config.json")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            cwd=tmp_path,
        )

        def write() -> None:
            pieces = feed if isinstance(feed, list) else [feed]
            for piece in pieces:
                for start in range(0, len(piece), 65536):  # a pipe hands over 64 KiB at a time
                    child.stdin.write(piece[start : start + 65536])
            child.stdin.close()

        writer = threading.Thread(target=write)
        writer.start()
        code, rss = child.stdout.read().split()
        child.wait(60)
        writer.join(60)
    return int(code), err_path.read_text(), int(rss)


BOMBS = {
    "number field": ('"tokens": 1e200000000', "measure.tokens"),
    "string field": ('"tokens": 1, "note": 1e200000000', "metadata.note"),
    "timestamp": ('"tokens": 1, "at": 1e200000000', "ts"),
    "tiny number": ('"tokens": 1e-200000000', "measure.tokens"),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_a_16_byte_number_bomb_is_refused_cheaply_naming_the_field(sandbox, tmp_path, case):
    fields, field = BOMBS[case]
    base = {"id": 1, "account": "a", "at": RECENT, "note": "n"}
    record = json.dumps(base)[:-1] + ", " + fields + "}"
    if '"at": 1e' in fields:
        record = record.replace(f'"at": {RECENT}, ', "")
    if '"note": 1e' in fields:
        record = record.replace('"note": "n", ', "")
    lines = [*singer("usage", usage(2), key_properties=["id"]), record_line(record)]
    code, stderr, rss = run_measured(
        tmp_path, config_for("m3ter", sandbox, max_rejected_ratio=1), ("\n".join(lines) + "\n").encode()
    )
    assert code == 0, stderr
    assert "Traceback" not in stderr
    (dead,) = dead_letters(tmp_path)
    assert dead["field"] == field
    assert (tmp_path / DEAD).stat().st_size < 10_000
    assert rss < 300 * 2**20
    assert sandbox.stats("m3ter")["stored"] == 2


def test_a_50_mb_line_through_a_pipe_is_read_whole(sandbox, tmp_path):
    blob = "x" * (50 * 2**20)
    record = {"id": 1, "account": "a", "at": RECENT, "tokens": 1, "note": "n", "blob": blob}
    lines = singer("usage", usage(2, start=10), key_properties=["id"])
    feed = [("\n".join(lines) + "\n").encode(), (record_line(json.dumps(record)) + "\n").encode()]
    code, stderr, rss = run_measured(tmp_path, config_for("m3ter", sandbox), feed)
    assert code == 0, stderr
    assert sandbox.stats("m3ter")["stored"] == 3
    assert rss < 300 * 2**20


# --- settings (exit 2 before reading input, no secret echoed) ----------------------------

SECRET = "s3cr3t-value-never-shown"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"dry_run": True, "dry_run_path": "/proc/nope/dry.jsonl"}, "dry_run_path: cannot write"),
        ({"m3ter_ingest_url": "ftp://example.com"}, "m3ter_ingest_url: 'ftp://example.com' is not an http"),
        ({"m3ter_auth_url": "http://"}, "m3ter_auth_url: 'http://' is not an http"),
        ({"m3ter_org_id": "my org"}, "m3ter_org_id: 'my org' is not an Organization id"),
        ({"m3ter_org_id": "org\r\nX-Injected: 1"}, "m3ter_org_id:"),
        ({"max_rejected_records": -1}, "max_rejected_records: must be a finite number from 0 to"),
        ({"max_requests_per_second": -2}, "max_requests_per_second: must be a finite number from 0 to"),
        # every numeric setting finite and in its documented range (issue 20)
        (
            {"state_checkpoint_seconds": 1e12},
            "state_checkpoint_seconds: must be a finite number from 0 to 86,400",
        ),
        ({"request_timeout_seconds": 0}, "request_timeout_seconds: must be a finite number from more than 0"),
        ({"progress_interval_seconds": -1}, "progress_interval_seconds: must be a finite number from 0"),
        ({"max_retry_seconds": 1e9}, "max_retry_seconds: must be a finite number from 0 to 604,800"),
        ({"m3ter_api_secret": 987654321123}, "(secret value not shown)"),
        ({"m3ter_api_secret": SECRET[:10] + "\n" + SECRET[10:]}, "m3ter_api_secret: must not contain spaces"),
    ],
)
def test_bad_settings_stop_before_input_with_exit_2(sandbox, tmp_path, overrides, expected):
    config = config_for("m3ter", sandbox, **overrides)
    result = run_target(tmp_path, config, singer("usage", usage(3)))
    assert result.returncode == 2, result.stderr
    clean(result)
    assert expected in result.error_lines[0]
    assert "987654321123" not in result.stderr and SECRET[:10] not in result.stderr
    assert sandbox.stats("m3ter")["requests"] == 0 and sandbox.stats("m3ter")["token_requests"] == 0


@pytest.mark.parametrize(
    ("setting", "written", "expected"),
    [
        ("request_timeout_seconds", "1e400", "request_timeout_seconds: must be a finite number, got"),
        ("max_retry_seconds", "-1e400", "max_retry_seconds: must be a finite number, got"),
        ("orb_grace_period_hours", "1e300", "orb_grace_period_hours: must be more than 0 and at most 87,600"),
        ("max_rejected_records", "1e400", "max_rejected_records"),
        ("shutdown_grace_seconds", "NaN", "NaN is not valid JSON; settings take finite numbers"),
        ("request_timeout_seconds", "Infinity", "Infinity is not valid JSON; settings take finite numbers"),
        (
            "metronome_max_property_bytes",
            "-5",
            "metronome_max_property_bytes: must be 0 (no check) to 1,048,576",
        ),
    ],
)
def test_non_finite_numbers_in_a_config_file_are_one_line_and_exit_2(
    sandbox, tmp_path, setting, written, expected
):
    destination = setting.split("_", 1)[0] if setting.startswith(("orb_", "metronome_")) else "m3ter"
    text = json.dumps(config_for(destination, sandbox, **{setting: "PLACEHOLDER"}))
    path = tmp_path / "config.json"
    path.write_text(text.replace('"PLACEHOLDER"', written))
    done = subprocess.run([TARGET, "--config", str(path)], input=b"", capture_output=True, cwd=tmp_path)
    result = Result(done.returncode, done.stdout.decode(), done.stderr.decode())
    assert result.returncode == 2, result.stderr
    clean(result)
    assert expected in result.error_lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "TARGET_USAGE_BILLING_SHUTDOWN_GRACE_SECONDS",
            "nan",
            "shutdown_grace_seconds: must be a finite number",
        ),
        (
            "TARGET_USAGE_BILLING_REQUEST_TIMEOUT_SECONDS",
            "inf",
            "request_timeout_seconds: must be a finite number",
        ),
        ("TARGET_USAGE_BILLING_MAX_RETRY_SECONDS", "inf", "max_retry_seconds: must be a finite number"),
        (
            "TARGET_USAGE_BILLING_STATE_CHECKPOINT_SECONDS",
            "1e12",
            "state_checkpoint_seconds: must be a finite",
        ),
        (
            "TARGET_USAGE_BILLING_MAX_REQUESTS_IN_FLIGHT",
            "abc",
            "MAX_REQUESTS_IN_FLIGHT: expected a whole number",
        ),
        (
            "TARGET_USAGE_BILLING_MAPPINGS",
            "[not json",
            "TARGET_USAGE_BILLING_MAPPINGS: expected a JSON array",
        ),
        ("TARGET_USAGE_BILLING_MAPPINGS", '{"a": 1}', "expected a JSON array, got dict"),
    ],
)
def test_bad_environment_settings_are_one_line(sandbox, tmp_path, variable, value, expected):
    result = run_target(
        tmp_path,
        config_for("m3ter", sandbox),
        singer("usage", usage(2)),
        args=["--config", "ENV"],
        env={variable: value},
    )
    assert result.returncode == 2, result.stderr
    clean(result)
    assert expected in result.error_lines[0]


def test_missing_or_broken_config_files_are_one_line(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")
    for path, expected in [
        (tmp_path / "absent.json", "no such file"),
        (tmp_path / "broken.json", "not valid JSON"),
        (tmp_path / "list.json", "must hold a JSON object"),
    ]:
        done = subprocess.run(
            [TARGET, "--config", str(path)], capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert f"target-usage-billing: error: --config {path}: {expected}" in done.stderr
        assert "| ERROR" in done.stderr  # also at ERROR level, for log collectors


def test_secrets_with_surrounding_whitespace_are_trimmed(sandbox, tmp_path):
    config = config_for("m3ter", sandbox)
    config["m3ter_api_secret"] = config["m3ter_api_secret"] + "\n"
    config["m3ter_access_key_id"] = "  " + config["m3ter_access_key_id"]
    result = run_target(tmp_path, config, singer("usage", usage(3)))
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("m3ter")["stored"] == 3
    assert "Bearer" not in result.stderr


def test_too_many_requests_in_flight_is_capped_and_said(sandbox, tmp_path):
    result = run_target(
        tmp_path, config_for("m3ter", sandbox, max_requests_in_flight=100_000), singer("usage", usage(3))
    )
    assert result.returncode == 0, result.stderr
    assert "max_requests_in_flight=100000 is more than this target starts" in result.stderr
    assert sandbox.stats("m3ter")["stored"] == 3


def test_fractional_request_rates_are_kept():
    from target_usage_billing.target import TargetUsageBilling

    config = {
        "destination": "m3ter",
        "dry_run": True,
        "max_requests_per_second": 0.5,
        "progress_interval_seconds": 0,
        "dead_letter_path": os.devnull,
        "dry_run_path": os.devnull,
        "mappings": [USAGE_RULE_M3TER],
    }
    target = TargetUsageBilling(config=config, parse_env_config=False)
    assert target.billing_run.limiter.windows == [(1, 2.0)]
    target.billing_run.close()


# --- the API ------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@both
def test_api_unreachable_at_start_up_is_exit_4_in_one_line(sandbox, tmp_path, destination):
    url = f"http://127.0.0.1:{closed_port()}"
    urls = CASES[destination].url_settings(url)
    result = run_target(
        tmp_path, config_for(destination, sandbox, max_retry_seconds=1.5, **urls), singer("usage", usage(2))
    )
    assert result.returncode == 4, result.stderr
    clean(result)
    assert "retry budget" in result.error_lines[0] and "Connection refused" in result.error_lines[0]


def test_sigterm_while_the_credential_check_is_retrying_is_honoured(sandbox, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    config = config_for("metronome", sandbox, metronome_api_url=url, max_retry_seconds=120)
    (tmp_path / "config.json").write_text(json.dumps(config))
    child = subprocess.Popen(
        [TARGET, "--config", str(tmp_path / "config.json")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    time.sleep(1.5)  # inside the retries of GET /v1/customers
    started = time.monotonic()
    child.send_signal(signal.SIGTERM)
    _out, err = child.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert child.returncode == 7, err
    assert b"Traceback" not in err
    assert b"while checking the credentials, before any input was read" in err


def test_metronome_refusing_the_token_on_ingest_is_exit_3(sandbox, tmp_path):
    sandbox.faults({"kind": "403", "every": 1, "destination": "metronome"})
    result = run_target(tmp_path, config_for("metronome", sandbox), singer("usage", usage(5)))
    assert result.returncode == 3, result.stderr
    clean(result)
    assert "Metronome refused the API token (403 from POST /v1/ingest)" in result.error_lines[0]


def test_m3ter_401_is_reported_as_401(sandbox, tmp_path):
    sandbox.faults({"kind": "401", "every": 1, "destination": "m3ter"})
    result = run_target(tmp_path, config_for("m3ter", sandbox), singer("usage", usage(5)))
    assert result.returncode == 3, result.stderr
    clean(result)
    assert "m3ter refused a freshly issued token (401)" in result.error_lines[0]


def test_x_should_retry_false_is_not_retried(sandbox, tmp_path):
    sandbox.faults({"kind": "503", "count": 1, "headers": {"x-should-retry": "false"}})
    result = run_target(tmp_path, config_for("m3ter", sandbox), singer("usage", usage(5)))
    assert result.returncode == 4, result.stderr
    clean(result)
    assert sandbox.stats("m3ter")["requests"] == 1
    assert "m3ter answered 503" in result.error_lines[0]


def test_x_should_retry_true_and_retry_after_ms_are_honoured(sandbox, tmp_path):
    sandbox.faults(
        {"kind": "429", "count": 1, "headers": {"retry-after-ms": "200"}},
        {"kind": "401", "count": 1, "headers": {"x-should-retry": "true"}},
    )
    result = run_target(tmp_path, config_for("metronome", sandbox), singer("usage", usage(5)))
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("metronome")["stored"] == 5
    assert "retry 1 in 0.2s" in result.stderr


def test_an_absurd_retry_after_is_cut_to_the_retry_budget_and_said(sandbox, tmp_path):
    sandbox.faults({"kind": "503", "count": 1, "retry_after": "86400"})
    result = run_target(
        tmp_path, config_for("m3ter", sandbox, max_retry_seconds=2), singer("usage", usage(5))
    )
    clean(result)
    assert "the server asked to wait 86400s, longer than what is left of the 2s retry budget" in result.stderr
    assert result.returncode == 0, result.stderr  # the one last try succeeded
    assert sandbox.stats("m3ter")["stored"] == 5


def test_retry_decisions_follow_the_vendor_sdks():
    def answer(status: int, **headers: str) -> Response:
        return Response(status, headers, b"")

    def transient(response: Response) -> bool:
        return should_retry(response.status, response.headers).retry

    assert transient(answer(503)) and transient(answer(429)) and transient(answer(409))
    assert not transient(answer(400)) and not transient(answer(404))
    assert not transient(answer(503, **{"x-should-retry": "false"}))
    assert transient(answer(400, **{"x-should-retry": "true"}))
    assert retry_after_seconds({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert retry_after_seconds({"Retry-After": "9"}) == 9
    assert retry_after_seconds({"retry-after-ms": "nan", "Retry-After": "inf"}) is None

    class Failure:
        retry_after = 0.0

    waits = backoff_waits(base=0.5)
    next(waits)
    assert 0.25 <= waits.send(Failure()) <= 0.5  # "retry now" still waits a little


def test_m3ter_usage_in_the_future_is_refused_locally(sandbox, tmp_path):
    records = usage(3)
    records[1]["at"] = int(time.time()) + 86400
    result = run_target(
        tmp_path, config_for("m3ter", sandbox, max_rejected_ratio=1), singer("usage", records)
    )
    assert result.returncode == 0, result.stderr
    (dead,) = dead_letters(tmp_path)
    assert dead["stage"] == "validation" and "is in the future" in dead["reason"]
    assert sandbox.stats("m3ter")["stored"] == 2 and sandbox.stats("m3ter")["rejected_requests"] == 0


# --- running under Meltano ----------------------------------------------------------------


def test_sigint_then_sigterm_keeps_the_graceful_path(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, shutdown_grace_seconds=20, batch_size_rows=50)
    run = Pipeline(tmp_path, config, 100_000, every=100, pause=0.05, base_epoch=RECENT - 200_000)
    wait_until(lambda: sandbox.stats("m3ter")["stored"] >= 300)
    sandbox.faults(latency_ms=1500)  # requests in flight keep the target busy after SIGINT
    time.sleep(0.3)
    run.target.send_signal(signal.SIGINT)
    time.sleep(0.2)
    run.target.send_signal(signal.SIGTERM)  # what `meltano run` sends after Ctrl-C
    code = run.wait()
    assert code == 0, run.stderr
    assert "Received SIGTERM as well: still stopping gracefully" in run.stderr
    assert "exiting now" not in run.stderr
    assert run.states and run.states[-1]["bookmarks"]["usage"]["position"] <= sandbox.stats("m3ter")["stored"]


def test_no_unclosed_sockets_at_exit(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, batch_size_rows=10)
    result = run_target(tmp_path, config, singer("usage", usage(200)), env={"PYTHONWARNINGS": "always"})
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("m3ter")["requests"] == 20
    assert "ResourceWarning" not in result.stderr


def test_the_fatal_line_is_also_logged_at_error_level(sandbox, tmp_path):
    result = run_target(
        tmp_path, config_for("m3ter", sandbox, m3ter_org_id="bad org"), singer("usage", usage(1))
    )
    assert result.returncode == 2
    assert any("| ERROR" in line and "m3ter_org_id" in line for line in result.stderr.splitlines())


# --- outputs and answers that are named, not "unexpected" (issue 20) ----------------------


def test_stdout_closed_early_is_named_exit_9_without_a_traceback(sandbox, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config_for("m3ter", sandbox)))
    lines = "\n".join(singer("usage", usage(20), state={"p": 1})) + "\n"
    (tmp_path / "input.jsonl").write_text(lines)
    with open(tmp_path / "input.jsonl", "rb") as stdin:
        process = subprocess.Popen(
            [TARGET, "--config", str(config_path)],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # the reader goes away before the first STATE
        stderr = process.stderr.read().decode()
        code = process.wait(60)
    assert code == 9, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "stdout was closed early (broken pipe)" in errors[0]
    assert "unexpected error" not in stderr
    assert sandbox.stats("m3ter")["stored"] == 20  # delivered; only the STATE had nowhere to go


@both
def test_a_413_names_the_batch_size_settings(sandbox, tmp_path, destination):
    sandbox.faults({"kind": "413", "count": 1, "destination": destination})
    result = run_target(tmp_path, config_for(destination, sandbox), singer("usage", usage(5), state={"p": 1}))
    assert result.returncode == 4, result.stderr
    clean(result)
    assert "answered 413 (request body too large)" in result.error_lines[0]
    assert "lower batch_max_bytes" in result.error_lines[0]
    assert result.states == []
