"""Where the run journal lives: an SQLite file (the default) or a PostgreSQL database.

Every write is an additive upsert in one short transaction, so any number of runs (on one
machine with SQLite in WAL mode, on many with PostgreSQL) may share a journal: counts and
exact decimal sums add up, and no run overwrites another's figures. Decimal sums are kept
as exact text in SQLite (added by a SQL function in Python) and as NUMERIC in PostgreSQL.
"""

from __future__ import annotations

import contextlib
import decimal
import os
import sqlite3
import threading
import typing as t

import msgspec

from target_usage_billing.errors import JournalError

BucketKey = tuple[str, str, str, str]  # stream, customer, meter, UTC hour of usage ("YYYY-MM-DDTHH")
# Sums are added with enough digits that no realistic total is ever rounded.
EXACT = decimal.Context(prec=200, Emax=999_999, Emin=-999_999)
# A bucket's sums as SQLite keeps them, {"field": "exact decimal text"} in key order
# (msgspec: ~15x cheaper than json per row, and commits write a row per bucket).
_encode_sums = msgspec.json.Encoder(order="sorted").encode
_decode_sums = msgspec.json.decode

SAMPLE_CAP = 100  # ids kept per bucket, whatever the number of runs
SCHEMA_VERSION = 2  # 2: buckets per hour (1: per day)
VERSION_QUERY = "SELECT value FROM journal_meta WHERE name = 'schema_version'"
SCHEMA = """
CREATE TABLE IF NOT EXISTS journal_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal_runs (
    run_id TEXT PRIMARY KEY, scope TEXT NOT NULL, started_at TEXT NOT NULL,
    finished_at TEXT, outcome TEXT, items BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS journal_buckets (
    scope TEXT NOT NULL, stream TEXT NOT NULL, customer TEXT NOT NULL, meter TEXT NOT NULL,
    hour TEXT NOT NULL, items BIGINT NOT NULL, first_sent_at TEXT NOT NULL, last_sent_at TEXT NOT NULL,
    sums {json} NOT NULL, PRIMARY KEY (scope, stream, customer, meter, hour));
CREATE TABLE IF NOT EXISTS journal_samples (
    scope TEXT NOT NULL, item_id TEXT NOT NULL, stream TEXT NOT NULL, customer TEXT NOT NULL,
    meter TEXT NOT NULL, hour TEXT NOT NULL, body_digest TEXT NOT NULL, run_id TEXT NOT NULL,
    sent_at TEXT NOT NULL, PRIMARY KEY (scope, item_id));
CREATE INDEX IF NOT EXISTS journal_samples_bucket
    ON journal_samples (scope, stream, customer, meter, hour);
CREATE TABLE IF NOT EXISTS journal_resent (
    scope TEXT NOT NULL, stream TEXT NOT NULL, items BIGINT NOT NULL, PRIMARY KEY (scope, stream));
CREATE TABLE IF NOT EXISTS journal_tails (
    scope TEXT NOT NULL, stream TEXT NOT NULL, ids TEXT NOT NULL, PRIMARY KEY (scope, stream));
CREATE INDEX IF NOT EXISTS journal_samples_hour ON journal_samples (scope, stream, hour, sent_at);
CREATE TABLE IF NOT EXISTS journal_tail_times (
    scope TEXT NOT NULL, stream TEXT NOT NULL, sent_at TEXT NOT NULL, PRIMARY KEY (scope, stream));
CREATE TABLE IF NOT EXISTS journal_id_schemes (
    scope TEXT NOT NULL, stream TEXT NOT NULL, scheme TEXT NOT NULL, PRIMARY KEY (scope, stream));
"""

# One bucket's figures as read back: (stream, customer, meter, hour, items, {field: total}).
BucketRow = tuple[str, str, str, str, int, dict[str, decimal.Decimal]]
SampleRow = tuple[str, str, str, str, str, str]  # item_id, stream, customer, meter, hour, digest


def hours_of(first_day: str, last_day: str) -> tuple[str, str]:
    """The hours from the start of ``first_day`` to the end of ``last_day`` ("YYYY-MM-DD"),
    as bounds for ``hour >= ? AND hour <= ?``."""
    return f"{first_day}T00", f"{last_day}T23"


class JournalStore:
    """The SQL both back ends run; ``_execute``/``_transaction`` differ."""

    placeholder = "?"
    json_type = "TEXT"  # sums: {"field": "exact decimal text", ...}
    add_sums = "journal_add_sums(journal_buckets.sums, excluded.sums)"

    def __init__(self, where: str):
        self.where = where  # a path or a URL without its password, for messages
        self._lock = threading.Lock()

    # --- back-end specifics -------------------------------------------------------------

    def _run(self, statements: list[tuple[str, t.Iterable[t.Sequence[t.Any]]]]) -> None:
        """Run each (sql, rows) with executemany, all in one transaction."""
        raise NotImplementedError

    def _query(self, sql: str, args: t.Sequence[t.Any]) -> list[tuple]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def check_version(self, rows: list[tuple]) -> None:
        """Refuse a journal an earlier version wrote (``rows``: its VERSION_QUERY)."""
        found = rows[0][0] if rows else None
        if found is not None and found != str(SCHEMA_VERSION):
            raise JournalError(
                f"the journal {self.where} has schema version {found}, and this version of "
                f"target-usage-billing keeps version {SCHEMA_VERSION} (usage per hour, not per day): "
                "point journal_path (or journal_url) at a new journal, and keep the old one to read "
                "its history"
            )

    def _sql(self, text: str) -> str:
        return text.replace("?", self.placeholder) if self.placeholder != "?" else text

    # --- writes -------------------------------------------------------------------------

    def run_started(self, run_id: str, scope: str, at: str) -> None:
        sql = "INSERT INTO journal_runs (run_id, scope, started_at) VALUES (?, ?, ?)"
        self._run([(self._sql(sql), [(run_id, scope, at)])])

    def run_finished(self, run_id: str, outcome: str, at: str, items: int) -> None:
        sql = "UPDATE journal_runs SET finished_at = ?, outcome = ?, items = ? WHERE run_id = ?"
        self._run([(self._sql(sql), [(at, outcome, items, run_id)])])

    def commit(
        self,
        scope: str,
        run_id: str,
        buckets: t.Iterable[tuple[BucketKey, int, t.Mapping[str, t.Any]]],
        samples: t.Iterable[tuple[BucketKey, str, str]],
        resent: t.Mapping[str, int],
        tails: t.Mapping[str, t.Sequence[str]],
        at: str,
        schemes: t.Mapping[str, str] | None = None,
        tails_changed: t.Iterable[str] | None = None,
    ) -> None:
        """Add ``buckets`` ((key, items, {field: exact total}), each key once) and
        ``samples`` ((key, item id, body digest)), both in key order: one order for every
        run, so concurrent upserts never wait on each other in a cycle (read as they are
        written: they may come from the journal's spill). ``tails_changed``: the streams
        whose tail is new in this commit (their tail time is this commit's); None: every
        stream in ``tails``."""
        if tails_changed is None:
            tails_changed = list(tails)
        bucket_rows = (
            (scope, *key, items, at, at, _encode_sums({n: str(v) for n, v in totals.items()}).decode())
            for key, items, totals in buckets
        )
        sample_rows = (
            (scope, item_id, *key, item_digest, run_id, at, scope, *key)
            for key, item_id, item_digest in samples
        )
        statements: list[tuple[str, t.Iterable[t.Sequence[t.Any]]]] = [
            (
                self._sql(
                    "INSERT INTO journal_buckets (scope, stream, customer, meter, hour, items, "
                    "first_sent_at, last_sent_at, sums) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (scope, stream, customer, meter, hour) DO UPDATE SET "
                    "items = journal_buckets.items + excluded.items, last_sent_at = excluded.last_sent_at, "
                    f"sums = {self.add_sums}"
                ),
                bucket_rows,
            ),
            (
                # an id once (a re-send in a later run is not sampled again)
                self._sql(
                    "INSERT INTO journal_samples (scope, item_id, stream, customer, meter, hour, "
                    "body_digest, run_id, sent_at) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE ("
                    "SELECT COUNT(*) FROM journal_samples WHERE scope = ? AND stream = ? AND "
                    f"customer = ? AND meter = ? AND hour = ?) < {SAMPLE_CAP} "
                    "ON CONFLICT (scope, item_id) DO NOTHING"
                ),
                sample_rows,
            ),
            (
                self._sql(
                    "INSERT INTO journal_resent (scope, stream, items) VALUES (?, ?, ?) "
                    "ON CONFLICT (scope, stream) DO UPDATE SET items = journal_resent.items + excluded.items"
                ),
                [(scope, stream, count) for stream, count in sorted(resent.items())],
            ),
            (
                self._sql(
                    "INSERT INTO journal_tails (scope, stream, ids) VALUES (?, ?, ?) "
                    "ON CONFLICT (scope, stream) DO UPDATE SET ids = excluded.ids"
                ),
                [(scope, stream, "\n".join(ids)) for stream, ids in sorted(tails.items())],
            ),
            (
                # when each tail was acknowledged (the re-send horizon, horizon.py)
                self._sql(
                    "INSERT INTO journal_tail_times (scope, stream, sent_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (scope, stream) DO UPDATE SET sent_at = excluded.sent_at"
                ),
                [(scope, stream, at) for stream in sorted(tails_changed or ())],
            ),
            (
                self._sql(
                    "INSERT INTO journal_id_schemes (scope, stream, scheme) VALUES (?, ?, ?) "
                    "ON CONFLICT (scope, stream) DO UPDATE SET scheme = excluded.scheme"
                ),
                [(scope, stream, scheme) for stream, scheme in sorted((schemes or {}).items())],
            ),
        ]
        self._run([(sql, rows) for sql, rows in statements if not isinstance(rows, list) or rows])

    # --- reads --------------------------------------------------------------------------

    def tail(self, scope: str, stream: str) -> set[str]:
        sql = "SELECT ids FROM journal_tails WHERE scope = ? AND stream = ?"
        rows = self._query(self._sql(sql), (scope, stream))
        return set(rows[0][0].split("\n")) if rows and rows[0][0] else set()

    def tail_sent_at(self, scope: str, stream: str) -> str | None:
        """When ``stream``'s tail was committed ("YYYY-MM-DDTHH:MM:SSZ"; None: unknown)."""
        sql = "SELECT sent_at FROM journal_tail_times WHERE scope = ? AND stream = ?"
        rows = self._query(self._sql(sql), (scope, stream))
        return rows[0][0] if rows else None

    def samples_sent_before(
        self, scope: str, stream: str, day: str, before: str, limit: int
    ) -> dict[str, str]:
        """The sampled ids of ``stream``'s usage on ``day`` ("YYYY-MM-DD") committed before
        ``before``, with when (at most ``limit``)."""
        sql = (
            "SELECT item_id, sent_at FROM journal_samples WHERE scope = ? AND stream = ? AND hour >= ? "
            f"AND hour <= ? AND sent_at < ? ORDER BY sent_at LIMIT {int(limit)}"
        )
        return dict(self._query(self._sql(sql), (scope, stream, *hours_of(day, day), before)))

    def id_scheme(self, scope: str, stream: str) -> str | None:
        sql = "SELECT scheme FROM journal_id_schemes WHERE scope = ? AND stream = ?"
        rows = self._query(self._sql(sql), (scope, stream))
        return rows[0][0] if rows else None

    def buckets(self, scope: str, since: str, until: str) -> list[BucketRow]:
        """Buckets whose hour is in the days [since, until] (days as "YYYY-MM-DD")."""
        rows = self._query(
            self._sql(
                "SELECT stream, customer, meter, hour, items, sums FROM journal_buckets "
                "WHERE scope = ? AND hour >= ? AND hour <= ? ORDER BY customer, meter, hour, stream"
            ),
            (scope, *hours_of(since, until)),
        )
        out = []
        for stream, customer, meter, hour, items, sums in rows:
            totals = _decode_sums(sums) if isinstance(sums, str) else sums  # PostgreSQL: jsonb
            exact = {name: decimal.Decimal(str(value)) for name, value in totals.items()}
            out.append((stream, customer, meter, hour, int(items), exact))
        return out

    def samples(self, scope: str, since: str, until: str) -> list[SampleRow]:
        return [
            tuple(row)
            for row in self._query(
                self._sql(
                    "SELECT item_id, stream, customer, meter, hour, body_digest FROM journal_samples "
                    "WHERE scope = ? AND hour >= ? AND hour <= ? ORDER BY hour, item_id"
                ),
                (scope, *hours_of(since, until)),
            )
        ]

    def resent(self, scope: str) -> dict[str, int]:
        rows = self._query(self._sql("SELECT stream, items FROM journal_resent WHERE scope = ?"), (scope,))
        return {stream: int(items) for stream, items in rows}


def add_sums(a: str, b: str) -> str:
    """Two buckets' sums ({"field": "decimal text"}) added field by field, exactly."""
    total = _decode_sums(a)
    for name, value in _decode_sums(b).items():
        total[name] = str(EXACT.add(decimal.Decimal(total.get(name, "0")), decimal.Decimal(value)))
    return _encode_sums(total).decode()


class SqliteJournalStore(JournalStore):
    """One SQLite file in WAL mode; a busy timeout lets concurrent runs take turns."""

    def __init__(self, path: str, busy_timeout_seconds: float = 10.0):
        super().__init__(path)
        with self._errors("open"):
            self._db = sqlite3.connect(
                path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=False
            )
            self._db.create_function("journal_add_sums", 2, add_sums, deterministic=True)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the STATE it precedes is written
            self._db.execute("PRAGMA synchronous=FULL")
        with self._lock, self._errors("create tables in"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for number, statement in enumerate(SCHEMA.format(json=self.json_type).split(";")):
                    if statement.strip():
                        self._db.execute(statement)
                    if number == 0:  # journal_meta: refuse a journal this version cannot read
                        self.check_version(self._db.execute(VERSION_QUERY).fetchall())
                self._db.execute(
                    "INSERT INTO journal_meta (name, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT (name) DO NOTHING",
                    (str(SCHEMA_VERSION),),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _run(self, statements: list[tuple[str, t.Iterable[t.Sequence[t.Any]]]]) -> None:
        with self._lock, self._errors("write"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: t.Sequence[t.Any]) -> list[tuple]:
        with self._lock, self._errors("read"):
            return self._db.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def _errors(self, doing: str) -> t.Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise JournalError(f"journal_path: cannot {doing} {self.where!r}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()


DEFAULT_JOURNAL_NAME = "target-usage-billing-journal.sqlite"


def open_store(url: str | None, path: str | None, dead_letter_path: str) -> JournalStore:
    """The journal at ``url`` (PostgreSQL) or ``path`` (SQLite; by default beside the dead
    letters)."""
    if url:
        from target_usage_billing.journal_postgres import PostgresJournalStore

        return PostgresJournalStore(url)
    where = path or os.path.join(os.path.dirname(dead_letter_path), DEFAULT_JOURNAL_NAME)
    return SqliteJournalStore(where)
