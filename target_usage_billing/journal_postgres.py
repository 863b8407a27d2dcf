"""The run journal in PostgreSQL (``journal_url``), for pipelines on many machines.

Same tables and upserts as SQLite (journal_store.py); sums are NUMERIC, added by the
server exactly. Needs psycopg 3: ``pip install 'target-usage-billing[postgres]'``.
"""

from __future__ import annotations

import contextlib
import threading
import typing as t
import urllib.parse

from target_usage_billing.errors import ConfigError, JournalError
from target_usage_billing.journal_store import SCHEMA, SCHEMA_VERSION, VERSION_QUERY, JournalStore

# Two buckets' sums added field by field by the server, exactly (numeric), kept as text.
ADD_SUMS = """
CREATE OR REPLACE FUNCTION journal_add_sums(a jsonb, b jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT COALESCE(
        jsonb_object_agg(k, ((COALESCE(a ->> k, '0'))::numeric + (COALESCE(b ->> k, '0'))::numeric)::text),
        '{}'::jsonb)
    FROM jsonb_object_keys(a || b) AS k
$$
"""
# A fixed key for pg_advisory_xact_lock: runs creating the tables at once take turns.
_SCHEMA_LOCK = 0x7475_6200


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class PostgresJournalStore(JournalStore):
    placeholder = "%s"
    json_type = "JSONB"
    add_sums = "journal_add_sums(journal_buckets.sums, excluded.sums)"

    def __init__(self, url: str, connect_timeout_seconds: int = 10):
        super().__init__(_without_password(url))
        try:
            import psycopg
        except ImportError:
            msg = "journal_url: PostgreSQL needs psycopg; pip install 'target-usage-billing[postgres]'"
            raise ConfigError(msg) from None
        self._psycopg = psycopg
        self._lock = threading.Lock()
        with self._errors("connect to"):
            self._db = psycopg.connect(url, connect_timeout=connect_timeout_seconds, autocommit=False)
        with self._lock, self._errors("create tables in"), self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for number, statement in enumerate([*SCHEMA.format(json=self.json_type).split(";"), ADD_SUMS]):
                if statement.strip():
                    self._db.execute(statement)
                if number == 0:  # journal_meta: refuse a journal this version cannot read
                    self.check_version(self._db.execute(VERSION_QUERY).fetchall())
            self._db.execute(
                "INSERT INTO journal_meta (name, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (name) DO NOTHING",
                (str(SCHEMA_VERSION),),
            )

    @contextlib.contextmanager
    def _errors(self, doing: str) -> t.Iterator[None]:
        try:
            yield
        except (self._psycopg.Error, OSError) as exc:
            lines = str(exc).strip().splitlines()
            reason = lines[0] if lines else type(exc).__name__
            raise JournalError(f"journal_url: cannot {doing} {self.where}: {reason}") from None

    def _run(self, statements: list[tuple[str, t.Iterable[t.Sequence[t.Any]]]]) -> None:
        with self._lock, self._errors("write"), self._db.transaction(), self._db.cursor() as cursor:
            for sql, rows in statements:
                cursor.executemany(sql, rows)

    def _query(self, sql: str, args: t.Sequence[t.Any]) -> list[tuple]:
        with self._lock, self._errors("read"), self._db.transaction():
            return list(self._db.execute(sql, args).fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()
