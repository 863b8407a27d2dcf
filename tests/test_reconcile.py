"""--reconcile: what each platform kept, read back with its own read API and compared with
the journal, against the sandbox with and without the faults platforms really have
(an item acknowledged and never stored; one stored, then reported invalid)."""

from __future__ import annotations

import time

import pytest

from target_usage_billing.journal_store import DEFAULT_JOURNAL_NAME, SqliteJournalStore
from tests.helpers import dead_letters, run_target, singer, usage
from tests.platforms import CASES, DESTINATIONS_UNDER_TEST, config_for

ROWS = 35
# platforms that accept first and report invalid items later, through their own channel
VALIDATE_LATER = [name for name, case in CASES.items() if case.validates_later]


def load(sandbox, tmp_path, destination: str, **overrides) -> dict:
    """Send ROWS usage rows; the config, which --reconcile then reads with."""
    config = config_for(destination, sandbox, journal_sample_rate=1, batch_size_rows=10, **overrides)
    result = run_target(tmp_path, config, singer("usage", usage(ROWS), state={"bookmark": ROWS}))
    assert result.returncode == 0, result.stderr
    return config


def reconcile(tmp_path, config: dict, *args: str):
    return run_target(tmp_path, config, "", args=["--reconcile", *args])


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_a_clean_load_is_confirmed(sandbox, tmp_path, destination):
    config = load(sandbox, tmp_path, destination)

    result = reconcile(tmp_path, config)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "every item checked is confirmed" in result.stdout
    if CASES[destination].reads_by_id:
        assert f"checked {ROWS} of {ROWS} ids" in result.stdout
    else:  # totals: one row per customer and field, no difference
        rows = [line for line in result.stdout.splitlines() if line.strip().startswith("a")]
        assert len(rows) == 7 and all(line.split()[-1] == "0" for line in rows)
    assert sandbox.stats(destination)["read_requests"] > 0


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_items_lost_after_the_acknowledgement_are_found(sandbox, tmp_path, destination):
    sandbox.faults({"kind": "lost-after-ack", "every": 7, "destination": destination})
    config = load(sandbox, tmp_path, destination)
    lost = sandbox.stats(destination)["lost_ids"]
    assert len(lost) == ROWS // 7

    result = reconcile(tmp_path, config)

    assert result.returncode == 8, result.stdout + result.stderr
    assert "MISMATCH" in result.stdout
    (line,) = result.error_lines
    assert "does not hold everything" in line
    if CASES[destination].reads_by_id:
        assert f"{len(lost)} missing" in line
        for item_id in lost:
            assert item_id in result.stdout
    else:  # the customers whose totals are short: those of the lost ids (the journal knows)
        store = SqliteJournalStore(str(tmp_path / DEFAULT_JOURNAL_NAME))
        customer_of = {row[0]: row[2] for row in store.samples(only_scope(store), "0000", "9999")}
        short = {
            line.split()[0]
            for line in result.stdout.splitlines()
            if line.strip().startswith("a") and line.split()[-1] != "0"
        }
        assert short == {customer_of[item_id] for item_id in lost}


def only_scope(store: SqliteJournalStore) -> str:
    (scope,) = {row[0] for row in store._query("SELECT scope FROM journal_runs", ())}
    return scope


@pytest.mark.parametrize("destination", VALIDATE_LATER)
def test_items_the_platform_reports_invalid_later_are_dead_lettered(sandbox, tmp_path, destination):
    sandbox.faults({"kind": "invalid-after-ack", "every": 5, "destination": destination})
    config = load(sandbox, tmp_path, destination)
    invalid = sandbox.stats(destination)["invalid_ids"]
    assert len(invalid) == ROWS // 5

    result = reconcile(tmp_path, config)

    assert result.returncode == 8, result.stdout + result.stderr
    letters = [letter for letter in dead_letters(tmp_path) if letter["stage"] == "platform"]
    assert sorted(letter["id"] for letter in letters) == sorted(invalid)
    for letter in letters:
        assert "reported it invalid" in letter["reason"]
        assert letter["customer"].startswith("a") or destination in ("m3ter", "stripe")
    for item_id in invalid:
        assert f"invalid: {item_id}" in result.stdout


def test_the_window_is_the_days_asked(sandbox, tmp_path):
    config = load(sandbox, tmp_path, "metronome")

    result = reconcile(tmp_path, config, "--since", "2020-01-01", "--until", "2020-01-31")

    assert result.returncode == 0, result.stderr
    assert "2020-01-01 to 2020-01-31" in result.stdout
    assert "nothing to check" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--since", "2026-02-30"], "--since: '2026-02-30' is not an ISO 8601 date"),
        (["--since", "2026-03-02", "--until", "2026-03-01"], "is after --until"),
    ],
)
def test_a_bad_window_is_exit_2(sandbox, tmp_path, args, expected):
    config = config_for("m3ter", sandbox)

    result = reconcile(tmp_path, config, *args)

    assert result.returncode == 2, result.stderr
    (line,) = result.error_lines
    assert expected in line


def test_since_without_reconcile_is_exit_2(sandbox, tmp_path):
    config = config_for("m3ter", sandbox)

    result = run_target(tmp_path, config, "", args=["--since", "2026-01-01"])

    assert result.returncode == 2, result.stderr
    assert "--since and --until go with --reconcile" in result.stderr


def test_refused_credentials_are_exit_3_without_the_secret(sandbox, tmp_path):
    config = load(sandbox, tmp_path, "metronome")
    config["metronome_api_token"] = "not-the-token-1f2e3d"

    result = reconcile(tmp_path, config)

    assert result.returncode == 3, result.stderr
    (line,) = result.error_lines
    assert "check metronome_api_token" in line
    assert "not-the-token-1f2e3d" not in result.stdout + result.stderr


def test_an_unreachable_platform_is_exit_4(sandbox, tmp_path):
    config = load(sandbox, tmp_path, "m3ter")
    # m3ter's read API is on its API host (tokens, queries), the journal's account its org
    config.update(m3ter_auth_url="http://127.0.0.1:9", max_retry_seconds=1)

    result = reconcile(tmp_path, config)

    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr


def test_the_report_is_readable_by_the_official_numbers(sandbox, tmp_path):
    # exact decimals: what the journal summed is what the platform summed
    config = load(sandbox, tmp_path, "m3ter")
    stored = sum(int(item["measure"]["tokens"]) for item in sandbox.items("m3ter"))

    result = reconcile(tmp_path, config)

    assert result.returncode == 0, result.stdout
    sent = sum(int(line.split()[4]) for line in result.stdout.splitlines() if line.strip().startswith("a"))
    assert sent == stored == sum(range(ROWS))


def test_a_sample_says_how_much_it_checked_and_finds_what_it_holds(sandbox, tmp_path):
    # sample rate 0: only each bucket's first id of the run (7 customers, one day: 7 of 35)
    sandbox.faults({"kind": "lost-after-ack", "count": 1, "destination": "metronome"})
    # one request at a time: the first item to arrive (lost) is the run's first, sampled for its bucket
    config = config_for(
        "metronome", sandbox, journal_sample_rate=0, batch_size_rows=10, max_requests_in_flight=1
    )
    loaded = run_target(tmp_path, config, singer("usage", usage(ROWS), state={"bookmark": ROWS}))
    assert loaded.returncode == 0, loaded.stderr
    (lost,) = sandbox.stats("metronome")["lost_ids"]  # the very first item: sampled for its bucket

    result = reconcile(tmp_path, config)

    assert result.returncode == 8, result.stdout + result.stderr
    assert f"checked 7 of {ROWS} ids" in result.stdout
    assert lost in result.stdout


def test_orb_s_event_volume_finds_losses_no_sampled_id_shows(sandbox, tmp_path):
    # only each bucket's first id is sampled (rows 0..6, one a customer); the lost ones are
    # others: every 8th in order (one request at a time)
    config = config_for("orb", sandbox, journal_sample_rate=0, batch_size_rows=10, max_requests_in_flight=1)
    clean = run_target(tmp_path, config, singer("usage", usage(ROWS), state={"bookmark": ROWS}))
    assert clean.returncode == 0, clean.stderr
    confirmed = reconcile(tmp_path, config)
    assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
    (day_row,) = [line.split() for line in confirmed.stdout.splitlines() if line.strip().startswith("20")]
    assert day_row[1:] == [str(ROWS), str(ROWS)]  # sent, and the platform's count for the day

    sandbox.reset()
    (tmp_path / "again").mkdir()
    sandbox.faults({"kind": "lost-after-ack", "every": 8, "destination": "orb"})
    lossy = run_target(tmp_path / "again", config, singer("usage", usage(ROWS, start=100), state={"b": 1}))
    assert lossy.returncode == 0, lossy.stderr
    lost = sandbox.stats("orb")["lost_ids"]
    store = SqliteJournalStore(str(tmp_path / "again" / DEFAULT_JOURNAL_NAME))
    sampled = {row[0] for row in store.samples(only_scope(store), "0000", "9999")}
    assert lost and not sampled & set(lost)  # the ids checked show nothing wrong

    found = reconcile(tmp_path / "again", config)

    assert found.returncode == 8, found.stdout + found.stderr
    (day_row,) = [line.split() for line in found.stdout.splitlines() if line.strip().startswith("20")]
    assert day_row[1:4] == [str(ROWS), str(ROWS - len(lost)), "SHORT"]
    # compared hour by hour: the hours short are among those the rows were stamped in
    spanned = {time.strftime("%H", time.gmtime(row["at"])) for row in usage(ROWS, start=100)}
    assert day_row[4] == "(hours" and day_row[-1] == "UTC)"
    short = {hour.strip(",") for hour in day_row[5:-1]}
    assert short and short <= spanned
    (line,) = found.error_lines
    assert "0 missing" in line and f"{len(short)} hours short in its event volume" in line
