"""The run journal: acknowledged usage on disk before the STATE that covers it, counted once.

Every test compares the journal with what the sandbox actually stored.
"""

from __future__ import annotations

import collections
import decimal
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

import pytest

from target_usage_billing.journal_store import DEFAULT_JOURNAL_NAME, SqliteJournalStore
from tests.helpers import TARGET, Pipeline, dead_letters, position, run_target, singer, usage, wait_until
from tests.platforms import CASES, DESTINATIONS_UNDER_TEST, USAGE_RULE_M3TER, config_for, crash_config

EVERYTHING = ("0000", "9999")  # days from the beginning to the end of time


def journal(tmp_path, name: str = DEFAULT_JOURNAL_NAME) -> SqliteJournalStore:
    return SqliteJournalStore(str(tmp_path / name))


def only_scope(store: SqliteJournalStore) -> str:
    (scope,) = {row[0] for row in store._query("SELECT scope FROM journal_runs", ())}
    return scope


def journal_counts(store: SqliteJournalStore) -> collections.Counter[str]:
    """Items per customer, over every bucket of the journal's one scope."""
    counts: collections.Counter[str] = collections.Counter()
    for _stream, customer, _meter, _day, items, _sums in store.buckets(only_scope(store), *EVERYTHING):
        counts[customer] += items
    return counts


def journal_sums(store: SqliteJournalStore) -> dict[str, decimal.Decimal]:
    totals: dict[str, decimal.Decimal] = collections.defaultdict(decimal.Decimal)
    for _stream, customer, _meter, _day, _items, sums in store.buckets(only_scope(store), *EVERYTHING):
        for value in sums.values():
            totals[customer] += value
    return dict(totals)


def stored_counts(sandbox, destination: str) -> collections.Counter[str]:
    return collections.Counter(CASES[destination].customer(item) for item in sandbox.items(destination))


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_the_journal_holds_what_the_platform_stored_through_faults(sandbox, tmp_path, destination):
    # a stored-then-failed answer and a dropped connection: both re-sent, stored once
    sandbox.faults(
        {"kind": "stored-500", "count": 1, "destination": destination},
        {"kind": "drop", "count": 1, "destination": destination},
    )
    config = config_for(destination, sandbox, batch_size_rows=20)

    result = run_target(tmp_path, config, singer("usage", usage(300), state={"bookmark": 300}))

    assert result.returncode == 0, result.stderr
    store = journal(tmp_path)
    assert journal_counts(store) == stored_counts(sandbox, destination)
    assert sum(journal_counts(store).values()) == 300


def test_sums_are_exact_decimals(sandbox, tmp_path):
    rows = [{**row, "tokens": decimal.Decimal("0.000000000000000000000000000001")} for row in usage(7 * 40)]
    rows[0]["tokens"] = decimal.Decimal("123456789012345678901234567890.5")
    lines = singer("usage", [], state=None)
    lines += [
        '{"type": "RECORD", "stream": "usage", "record": '
        + str(row).replace("'", '"').replace('Decimal("', "").replace('")', "")
        + "}"
        for row in rows
    ]
    config = config_for("m3ter", sandbox)

    result = run_target(tmp_path, config, lines)

    assert result.returncode == 0, result.stderr
    sums = journal_sums(journal(tmp_path))
    assert sums["a0"] == decimal.Decimal("123456789012345678901234567890.5") + 39 * decimal.Decimal(
        "0.000000000000000000000000000001"
    )
    assert sums["a1"] == 40 * decimal.Decimal("0.000000000000000000000000000001")


def test_sums_an_earlier_release_wrote_keep_adding_up(tmp_path):
    store = journal(tmp_path)
    key = ("usage", "a0", "api", "2026-12-01T10")
    first = [(key, 1, {"tokens": decimal.Decimal("0.5")})]
    store.commit("scope", "run-1", first, [], {}, {}, "2026-12-01T10:00:00Z")
    # the text earlier versions wrote (json.dumps: spaces after the separators)
    earlier = json.dumps({"cost": "1", "tokens": "0.5"}, sort_keys=True)
    store._run([("UPDATE journal_buckets SET sums = ?", [(earlier,)])])

    later = {"tokens": decimal.Decimal("0.25"), "requests": 3}
    store.commit("scope", "run-2", [(key, 2, later)], [], {}, {}, "2026-12-01T11:00:00Z")

    (row,) = store.buckets("scope", *EVERYTHING)
    assert row[4:] == (3, {"cost": 1, "requests": 3, "tokens": decimal.Decimal("0.75")})


@pytest.mark.parametrize("destination", DESTINATIONS_UNDER_TEST)
def test_a_number_no_sum_can_hold_neither_stops_the_run_nor_enters_the_sums(sandbox, tmp_path, destination):
    # "1e9999999" as a property: text the platform may keep, which the journal once tried
    # to add (decimal.Overflow, a traceback, the run stopped); m3ter and Stripe refuse it
    rows = usage(30)
    rows[1]["tokens"] = "1e9999999"
    config = config_for(destination, sandbox)

    result = run_target(tmp_path, config, singer("usage", rows, state={"bookmark": 30}))

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    refused = dead_letters(tmp_path)
    assert [letter["record"]["id"] for letter in refused] == (
        [1] if destination in ("m3ter", "stripe") else []
    )
    store = journal(tmp_path)
    assert sum(journal_counts(store).values()) == 30 - len(refused) == len(sandbox.items(destination))
    assert all(value < 10**6 for value in journal_sums(store).values())  # tokens 0, 2 .. 29, and the rest


@pytest.mark.parametrize("destination", ["m3ter", "lago", "stripe"])
def test_a_resumed_run_after_sigkill_counts_nothing_twice(sandbox, tmp_path, destination):
    total = 2000
    sandbox.faults(latency_ms=60)  # keep requests in flight when the kill lands
    config = crash_config(sandbox, destination)
    base = int(time.time()) - 86400
    first = Pipeline(tmp_path, config, total, every=50, pause=0.02, name="first", base_epoch=base)
    wait_until(lambda: sandbox.stats(destination)["requests"] >= 6)
    first.kill()
    resume = first.states[-1] if first.states else None
    assert position(resume) < total
    second = Pipeline(tmp_path, config, total, state=resume, every=50, name="second", base_epoch=base)
    assert second.wait() == 0, second.stderr

    store = journal(tmp_path)
    assert journal_counts(store) == stored_counts(sandbox, destination)
    assert sum(journal_counts(store).values()) == total


def test_a_tap_re_reading_its_last_row_is_counted_once(sandbox, tmp_path):
    config = config_for("m3ter", sandbox)
    first = run_target(tmp_path, config, singer("usage", usage(50), state={"bookmark": 49}))
    # an inclusive replication key: the next run starts with the last row again
    second = run_target(tmp_path, config, singer("usage", usage(51, start=49), state={"bookmark": 99}))

    assert first.returncode == 0 and second.returncode == 0, second.stderr
    store = journal(tmp_path)
    assert sum(journal_counts(store).values()) == 100 == sandbox.stats("m3ter")["stored"]
    assert store.resent(only_scope(store)) == {"usage": 1}


def test_the_sample_is_bounded_and_the_file_does_not_grow_with_the_ids(sandbox, tmp_path):
    rows = [{**row, "account": "one"} for row in usage(3000)]
    config = config_for("m3ter", sandbox)

    result = run_target(tmp_path, config, singer("usage", rows))

    assert result.returncode == 0, result.stderr
    store = journal(tmp_path)
    scope = only_scope(store)
    assert sum(journal_counts(store).values()) == 3000
    samples = store.samples(scope, *EVERYTHING)
    days = collections.Counter(day for _id, _stream, _customer, _meter, day, _digest in samples)
    assert days and max(days.values()) <= 100  # at most 100 ids a bucket
    stored_ids = {item["uid"] for item in sandbox.items("m3ter")}
    assert {item_id for item_id, *_rest in samples} <= stored_ids


def run_pipelines_at_once(tmp_path, runs: list[tuple[dict, list[str]]]) -> list[str]:
    """Start one target per (config, input lines), each in its own directory, all at
    once; wait for each to succeed; their stderr."""
    processes = []
    for n, (config, lines) in enumerate(runs):
        directory = tmp_path / f"run{n}"
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "input.jsonl").write_text("\n".join(lines) + "\n")
        with open(directory / "input.jsonl", "rb") as stdin:
            processes.append(
                subprocess.Popen(
                    [TARGET, "--config", "config.json"],
                    stdin=stdin,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    cwd=directory,
                )
            )
    errors = []
    for process in processes:
        _out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()
        errors.append(err.decode())
    return errors


def stream_config(sandbox, stream: str, **settings) -> dict:
    config = config_for("m3ter", sandbox, batch_size_rows=10, **settings)
    config["mappings"] = [{**config["mappings"][0], "stream": stream}]
    return config


def test_runs_sharing_one_journal_add_up(sandbox, tmp_path):
    shared = tmp_path / "shared.sqlite"
    runs = [  # three pipelines at once, each its own stream
        (
            stream_config(sandbox, f"usage_{n}", journal_path=str(shared)),
            singer(f"usage_{n}", usage(200, start=1000 * n), state={"bookmark": n}),
        )
        for n in range(3)
    ]
    run_pipelines_at_once(tmp_path, runs)

    store = SqliteJournalStore(str(shared))
    assert sum(journal_counts(store).values()) == 600 == sandbox.stats("m3ter")["stored"]
    outcomes = store._query("SELECT outcome, items FROM journal_runs", ())
    assert sorted(outcomes) == [("succeeded", 200)] * 3


def test_a_dry_run_keeps_no_journal(tmp_path):
    config = {"destination": "m3ter", "dry_run": True, "mappings": [USAGE_RULE_M3TER]}

    result = run_target(tmp_path, config, singer("usage", usage(5)))

    assert result.returncode == 0, result.stderr
    assert not (tmp_path / DEFAULT_JOURNAL_NAME).exists()


def test_an_unwritable_journal_stops_the_run_before_input_with_exit_2(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, journal_path=str(tmp_path / "missing-dir" / "j.sqlite"))

    result = run_target(tmp_path, config, singer("usage", usage(5), state={"bookmark": 5}))

    assert result.returncode == 2, result.stderr
    (line,) = result.error_lines
    assert "journal_path" in line and "missing-dir" in line
    assert result.states == []
    assert sandbox.stats("m3ter")["requests"] == 0


def test_a_journal_an_earlier_version_kept_per_day_is_refused_before_input(sandbox, tmp_path):
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as db:  # what version 1 wrote first: buckets per day
        db.execute("CREATE TABLE journal_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO journal_meta VALUES ('schema_version', '1')")
        db.execute("CREATE TABLE journal_buckets (scope, stream, customer, meter, day)")
    config = config_for("m3ter", sandbox, journal_path=str(old))

    result = run_target(tmp_path, config, singer("usage", usage(5), state={"bookmark": 5}))

    assert result.returncode == 2, result.stderr
    (line,) = result.error_lines
    assert "schema version 1" in line and str(old) in line and "new journal" in line
    assert result.states == []
    assert sandbox.stats("m3ter")["requests"] == 0
    with sqlite3.connect(old) as db:  # left as it was, to read its history
        assert db.execute("SELECT value FROM journal_meta").fetchall() == [("1",)]


def test_a_journal_that_cannot_be_written_mid_run_releases_no_further_state(sandbox, tmp_path):
    total = 3000
    config = crash_config(sandbox)
    run = Pipeline(tmp_path, config, total, every=50, pause=0.05)
    wait_until(lambda: len(run.states) >= 2)
    blocker = sqlite3.connect(tmp_path / DEFAULT_JOURNAL_NAME, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the journal past the busy timeout
    try:
        code = run.wait(timeout=120)
        locked_states = run.states
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert code == 9, run.stderr
    assert "journal_path" in run.stderr and "database is locked" in run.stderr
    last = position(locked_states[-1])
    assert last < total
    # every STATE written is covered by the journal
    assert sum(journal_counts(journal(tmp_path)).values()) >= last


# --- PostgreSQL: one journal for pipelines on many machines ---------------------------

PG_PASSWORD = "pg-secret-4f1c9b"


def _postgres_bin() -> Path:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed (.ci/run installs the postgresql package)")
    return found[-1].parent


def _as_postgres_user(command: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres_url() -> t.Iterator[str]:
    """A real PostgreSQL server on loopback, password-protected, for this module."""
    # not under pytest's temporary directory: that is private to root, and the server
    # runs as the postgres user
    root = Path(tempfile.mkdtemp(prefix="target-usage-billing-pg-"))
    data, password_file = root / "data", root / "password"
    password_file.write_text(PG_PASSWORD)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(password_file, "postgres")
    bin_dir = _postgres_bin()
    subprocess.run(
        _as_postgres_user(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "billing",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={password_file}",
            ]
        ),
        check=True,
        capture_output=True,
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_postgres_user(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://billing:{PG_PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_postgres_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def test_pipelines_sharing_a_postgres_journal_add_up_exactly(sandbox, tmp_path, postgres_url):
    from target_usage_billing.journal_postgres import PostgresJournalStore

    runs = []
    for n in range(3):  # three pipelines at once, each its own stream
        stream = f"pg_usage_{n}"
        records = [
            json.dumps({"type": "RECORD", "stream": stream, "record": {**row, "tokens": 0}}).replace(
                '"tokens": 0', '"tokens": 0.1'
            )
            for row in usage(70, start=1000 * n)
        ]
        runs.append((stream_config(sandbox, stream, journal_url=postgres_url), singer(stream, []) + records))
    for err in run_pipelines_at_once(tmp_path, runs):
        assert PG_PASSWORD not in err

    store = PostgresJournalStore(postgres_url)
    scope = "m3ter demo-org"
    rows = [row for row in store.buckets(scope, *EVERYTHING) if row[0].startswith("pg_usage_")]
    assert sum(row[4] for row in rows) == 210 == sandbox.stats("m3ter")["stored"]
    total = sum((sum(row[5].values(), decimal.Decimal(0)) for row in rows), decimal.Decimal(0))
    assert total == decimal.Decimal("21.0")  # 210 x 0.1, exactly (NUMERIC)
    assert not (tmp_path / "run0" / DEFAULT_JOURNAL_NAME).exists()  # PostgreSQL, not a file
    store.close()


def spill_test_payload(number: int) -> dict:
    """Item ``number`` of the spill test: one in three in one hot bucket (ids falling, so
    the first ones are not the least), the others over 300 customers, 2 meters, 3 hours."""
    hot = number % 3 == 0
    return {
        "transaction_id": f"t{999999 - number}",
        "customer_id": "hot" if hot else f"c{number % 300}",
        "event_type": "m0" if hot else f"m{number // 7 % 2}",
        "timestamp": f"2026-11-01T0{0 if hot else number // 11 % 3}:00:00Z",
        "properties": {"tokens": str(number % 50), "cost": "0.0010", "calls": 1},
    }


def acknowledge_batches(kept, epochs: int, batches: int, size: int) -> t.Iterator[None]:
    """Batches of spill_test_payload acknowledged in ``kept`` (a Journal), ``batches`` an
    epoch, in order; yields after each."""
    import msgspec

    number = 0
    for epoch in range(epochs):
        for _batch in range(batches):
            tally, bodies = kept.tally("usage"), []
            first = number
            for _ in range(size):
                body = msgspec.json.encode(spill_test_payload(number))
                tally.add(msgspec.json.decode(body), body)
                bodies.append(body)
                number += 1
            kept.seal(tally, bodies)
            kept.acknowledged_tally("usage", tally, epoch, first)
            yield


@pytest.mark.parametrize("back_end", ["sqlite", "postgres"])
def test_uncommitted_usage_past_the_memory_bound_is_spilled_and_committed_exactly(
    request, tmp_path, back_end
):
    # A tap without STATE (or Orb's backfills) over many customers: memory keeps at most
    # held_entries buckets and sampled ids, the rest waits in the spill until its STATE
    # commits it, and the journal ends up holding what it holds when nothing is spilled:
    # the same counts, sums to the last written digit, and sampled ids (every id is
    # sampled here, so a bucket's first 100 are what is kept).
    from target_usage_billing.destinations.metronome import MetronomeDestination
    from target_usage_billing.journal import Journal, _entries

    if back_end == "sqlite":
        store = journal(tmp_path)
    else:
        from target_usage_billing.journal_postgres import PostgresJournalStore

        store = PostgresJournalStore(request.getfixturevalue("postgres_url"))
    fields = MetronomeDestination.journal_fields
    scopes = (f"in-memory-{back_end}", f"spilled-{back_end}")
    in_memory = Journal(store, scopes[0], fields, sample_rate=1)
    spilled = Journal(store, scopes[1], fields, sample_rate=1, held_entries=40)
    for _ in zip(acknowledge_batches(in_memory, 4, 10, 25), acknowledge_batches(spilled, 4, 10, 25)):
        assert sum(map(_entries, spilled._epochs.values())) <= 40
    assert sum(map(_entries, in_memory._epochs.values())) > 1000  # what would be held
    assert spilled._spill.epochs == {0, 1, 2, 3}
    for kept in (in_memory, spilled):
        kept.merge_epochs(None, 2)  # STATE 2 waits: epochs 0 and 1 are kept as one

    def held(scope: str) -> tuple[list, list]:
        buckets = [
            (*row[:5], {name: str(total) for name, total in row[5].items()})
            for row in store.buckets(scope, *EVERYTHING)
        ]
        return buckets, store.samples(scope, *EVERYTHING)

    for before_epoch in (2, None):  # the STATE numbered 2 commits epochs 0 and 1; the end, all
        in_memory.commit(before_epoch)
        spilled.commit(before_epoch)
        assert held(scopes[1]) == held(scopes[0])
        assert spilled.committed_items == in_memory.committed_items == (500 if before_epoch else 1000)
        assert spilled._spill.epochs == ({2, 3} if before_epoch else set())
    buckets, samples = held(scopes[1])
    keys = {
        tuple(spill_test_payload(n)[f] for f in ("customer_id", "event_type", "timestamp"))
        for n in range(1000)
    }
    assert len(buckets) == len(keys) > 500
    hot = [row for row in samples if row[2] == "hot"]
    assert len(hot) == 100 and "t999999" in {row[0] for row in hot}  # the first 100 of 334
    assert {row[5]["properties.cost"] for row in buckets if row[1] == "hot"} == {"0.3340"}  # as written
    for kept in (in_memory, spilled):
        kept.finish("succeeded")
    for _ in acknowledge_batches(spilled, 1, 4, 25):  # late acknowledgements, after the end
        pass
    assert spilled._spill._db is None  # nothing spilled again, no file opened
    store.close()


def test_a_spill_that_cannot_be_written_is_a_journal_error(tmp_path):
    # a full temporary directory, say: the run stops with one line, and no STATE past it
    from target_usage_billing.errors import JournalError
    from target_usage_billing.journal_spill import Spill

    spill = Spill()
    spill.add(0, {("s", "c", "m", "2026-11-01T00"): [1, {"v": 1}]}, {})
    spill._connection().close()
    with pytest.raises(JournalError, match="temporary file of usage not yet committed"):
        spill.add(1, {("s", "c", "m", "2026-11-01T00"): [1, {"v": 1}]}, {})
    with pytest.raises(JournalError):
        list(spill.buckets(None))


def test_the_spill_leaves_no_file_behind(tmp_path):
    # SQLite's private temporary database: its file is removed as it is opened, so even a
    # killed run leaves none in the temporary directory
    script = """if True:
        import os, sys
        from target_usage_billing.journal_spill import Spill
        spill = Spill()
        for epoch in range(20):  # some MB: beyond what SQLite keeps in memory
            spill.add(epoch, {("s", f"c{n}", "m", "h"): [1, {"v": n}] for n in range(5000)}, {})
        assert sum(1 for _ in spill.buckets(None)) == 5000
        opened = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith(sys.argv[1]):
                    opened.append(os.fstat(int(fd)).st_size)
            except FileNotFoundError:  # the listing's own
                pass
        print(len(os.listdir(sys.argv[1])), len(opened), sum(opened), flush=True)
        os.kill(os.getpid(), 9)
    """
    spill_dir = tmp_path / "tmp"
    spill_dir.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", script, str(spill_dir)],
        env={**os.environ, "SQLITE_TMPDIR": str(spill_dir)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == -9, done.stderr
    names, opened, size = map(int, done.stdout.split())
    assert (names, opened) == (0, 1)  # a file open in that directory, with no name there
    assert size > 1_000_000  # and holding what memory does not
    assert list(spill_dir.iterdir()) == []


def test_a_number_postgres_numeric_cannot_hold_is_not_summed(sandbox, tmp_path, postgres_url):
    # 1e200000 fits Python's decimals but not NUMERIC (131,072 digits before the point):
    # summed, it failed the commit that added to its bucket (the second run's), and with
    # it the run
    from target_usage_billing.journal_postgres import PostgresJournalStore

    config = config_for("metronome", sandbox, journal_url=postgres_url)
    config["mappings"] = [{**config["mappings"][0], "stream": "pg_big"}]
    for start in (0, 100):  # two runs, the same buckets
        rows = usage(15, start=start)
        rows[1]["tokens"] = "1e200000"

        result = run_target(tmp_path, config, singer("pg_big", rows, state={"bookmark": start}))

        assert result.returncode == 0, result.stderr
    store = PostgresJournalStore(postgres_url)
    scope = f"metronome {sandbox.url}"  # the platform and its API address
    rows_kept = [row for row in store.buckets(scope, *EVERYTHING) if row[0] == "pg_big"]
    store.close()
    assert sum(row[4] for row in rows_kept) == 30 == len(sandbox.items("metronome"))


def test_an_unreachable_postgres_journal_is_exit_2_without_the_password(sandbox, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here
    url = f"postgresql://billing:{PG_PASSWORD}@127.0.0.1:{port}/postgres"
    config = config_for("m3ter", sandbox, journal_url=url)

    result = run_target(tmp_path, config, singer("usage", usage(5), state={"bookmark": 5}))

    assert result.returncode == 2, result.stderr
    (line,) = result.error_lines
    assert "journal_url" in line and f"127.0.0.1:{port}" in line
    assert PG_PASSWORD not in result.stderr
    assert sandbox.stats("m3ter")["requests"] == 0
