"""Uncommitted journal aggregates moved out of memory (journal.py spills them past a bound).

A tap that never sends STATE, or Orb's backfills, which hold STATEs until the run ends,
would keep every bucket of the run in memory until its end. Past ``Journal``'s bound they
go here: a private temporary SQLite database, per epoch, added up as in the journal.
SQLite keeps a few pages of it in memory and the rest in a file it removes itself (an
empty file name; the file is unlinked as it is opened), so a killed run leaves nothing
behind; usage never committed is counted again by the run that sends it again.
"""

from __future__ import annotations

import contextlib
import decimal
import sqlite3
import typing as t

import msgspec

from target_usage_billing.errors import JournalError
from target_usage_billing.journal_store import EXACT, BucketKey
from target_usage_billing.journal_tally import SAMPLE_SIZE

# a bucket's totals as JSON: whole numbers as integers, decimals as their exact text
_encode = msgspec.json.Encoder(decimal_format="string").encode
_decode_json = msgspec.json.Decoder(dict[str, int | str]).decode

_SCHEMA = """
CREATE TABLE buckets (
    epoch INTEGER NOT NULL, stream TEXT NOT NULL, customer TEXT NOT NULL, meter TEXT NOT NULL,
    hour TEXT NOT NULL, items INTEGER NOT NULL, sums BLOB NOT NULL,
    PRIMARY KEY (epoch, stream, customer, meter, hour));
CREATE TABLE samples (
    epoch INTEGER NOT NULL, stream TEXT NOT NULL, customer TEXT NOT NULL, meter TEXT NOT NULL,
    hour TEXT NOT NULL, item_id TEXT NOT NULL, body_digest TEXT NOT NULL,
    PRIMARY KEY (epoch, stream, customer, meter, hour, item_id));
"""
_ADD_BUCKET = (
    "INSERT INTO buckets VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (epoch, stream, customer, meter, hour) DO UPDATE SET "
    "items = buckets.items + excluded.items, sums = journal_add_sums(buckets.sums, excluded.sums)"
)
# at most SAMPLE_SIZE ids per epoch and bucket, as in memory
_ADD_SAMPLE = (
    "INSERT INTO samples SELECT ?, ?, ?, ?, ?, ?, ? WHERE (SELECT COUNT(*) FROM samples WHERE "
    f"epoch = ? AND stream = ? AND customer = ? AND meter = ? AND hour = ?) < {SAMPLE_SIZE} "
    "ON CONFLICT DO NOTHING"
)
_READ_CHUNK = 1000  # rows fetched at a time while a commit reads them
_ALL = 2**62  # above every epoch


class Spill:
    """Buckets and sampled ids of epochs not yet committed, out of memory; used by one
    Journal under its lock. Its errors are JournalErrors: the run stops, no STATE past it."""

    def __init__(self) -> None:
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._committed_below = 0  # epochs below it are committed, whether or not deleted yet
        self.epochs: set[int] = set()  # epochs with rows here

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:  # made at the first spill: most runs never need one
            db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
            db.create_function("journal_add_sums", 2, _add_totals, deterministic=True)
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def add(
        self,
        epoch: int,
        buckets: t.Mapping[BucketKey, list],
        samples: t.Mapping[BucketKey, list[tuple[str, str]]],
    ) -> None:
        """Add one epoch's buckets ([items, {field: exact total}]) and samples (each
        bucket's in the order they came)."""
        if self._closed:  # the run has ended: nothing will commit them
            return
        with _errors("write"):
            db = self._connection()
            db.execute("BEGIN")
            try:
                db.executemany(
                    _ADD_BUCKET,
                    ((epoch, *key, items, _encode(totals)) for key, (items, totals) in buckets.items()),
                )
                db.executemany(
                    _ADD_SAMPLE,
                    (
                        (epoch, *key, item_id, item_digest, epoch, *key)
                        for key, sample in samples.items()
                        for item_id, item_digest in sample
                    ),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self.epochs.add(epoch)

    def holds(self, before_epoch: int | None) -> bool:
        bound = _ALL if before_epoch is None else before_epoch
        return any(self._committed_below <= epoch < bound for epoch in self.epochs)

    def buckets(self, before_epoch: int | None) -> t.Iterator[tuple[BucketKey, int, dict[str, t.Any]]]:
        """The buckets of the epochs below ``before_epoch`` (None: all) not yet committed,
        by key, each key once (its epochs added up)."""
        rows = self._read(
            "SELECT stream, customer, meter, hour, items, sums FROM buckets WHERE epoch >= ? AND epoch < ? "
            "ORDER BY stream, customer, meter, hour",
            before_epoch,
        )
        return added_up((row[:4], row[4], _decode(row[5])) for row in rows)

    def samples(self, before_epoch: int | None) -> t.Iterator[tuple[BucketKey, str, str]]:
        """The sampled ids of the epochs below ``before_epoch`` (None: all) not yet
        committed, by key, each bucket's in the order they came."""
        for stream, customer, meter, hour, item_id, item_digest in self._read(
            "SELECT stream, customer, meter, hour, item_id, body_digest FROM samples "
            "WHERE epoch >= ? AND epoch < ? ORDER BY stream, customer, meter, hour, rowid",
            before_epoch,
        ):
            yield (stream, customer, meter, hour), item_id, item_digest

    def committed(self, before_epoch: int | None) -> None:
        """The epochs below ``before_epoch`` (None: all) are committed: never read again,
        and deleted."""
        bound = _ALL if before_epoch is None else before_epoch
        self._committed_below = max(self._committed_below, bound)  # first: a failed delete reads none
        self.epochs = {epoch for epoch in self.epochs if epoch >= self._committed_below}
        if self._db is None:
            return
        with _errors("write"):
            self._db.execute("DELETE FROM buckets WHERE epoch < ?", (bound,))
            self._db.execute("DELETE FROM samples WHERE epoch < ?", (bound,))

    def close(self) -> None:
        self._closed = True
        self.epochs = set()
        if self._db is not None:
            self._db.close()
            self._db = None

    def _read(self, sql: str, before_epoch: int | None) -> t.Iterator[tuple]:
        if self._db is None:
            return
        with _errors("read"):
            cursor = self._db.execute(
                sql, (self._committed_below, _ALL if before_epoch is None else before_epoch)
            )
            while rows := cursor.fetchmany(_READ_CHUNK):
                yield from rows


def added_up(
    buckets: t.Iterable[tuple[BucketKey, int, dict[str, t.Any]]],
) -> t.Iterator[tuple[BucketKey, int, dict[str, t.Any]]]:
    """Key-ordered buckets, each key once: a key's adjacent rows added up (into a copy:
    the rows' totals are left as they are)."""
    pending: tuple[BucketKey, int, dict[str, t.Any]] | None = None
    for key, items, totals in buckets:
        if pending is not None and pending[0] == key:
            pending = (key, pending[1] + items, add_totals(dict(pending[2]), totals))
            continue
        if pending is not None:
            yield pending
        pending = (key, items, totals)
    if pending is not None:
        yield pending


def add_totals(a: dict[str, t.Any], b: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """``b``'s totals added into ``a``'s, field by field, exactly (ints stay ints)."""
    with decimal.localcontext(EXACT):
        for name, value in b.items():
            a[name] = a.get(name, 0) + value
    return a


def _decode(sums: bytes) -> dict[str, t.Any]:
    return {
        name: decimal.Decimal(value) if type(value) is str else value
        for name, value in _decode_json(sums).items()
    }


def _add_totals(a: bytes, b: bytes) -> bytes:
    """Two buckets' totals (as kept here) added field by field, exactly."""
    return _encode(add_totals(_decode(a), _decode(b)))


@contextlib.contextmanager
def _errors(doing: str) -> t.Iterator[None]:
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise JournalError(
            f"journal: cannot {doing} its temporary file of usage not yet committed (in SQLITE_TMPDIR or "
            f"TMPDIR): {exc}"
        ) from None
