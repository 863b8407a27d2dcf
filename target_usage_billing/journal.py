"""The run journal: what each platform acknowledged, kept before the STATE that covers it.

Per platform account ("scope"), stream, customer, meter (event name) and hour of usage:
how many items were acknowledged and the exact decimal sums of their numeric fields, plus
a bounded random sample of their ids (at most SAMPLE_SIZE a bucket) with body digests.
``--reconcile`` reads it back and asks each platform what it holds.

When it is written. Delivery hands every acknowledged request here (worker threads); its
items are counted in memory under the *epoch* of their batch: the number of STATEs that
had arrived when the batch was cut. A STATE numbered j covers every batch of an epoch
below j, so just before STATE j is written those epochs are committed in one
transaction. Usage acknowledged after the last STATE is committed at the end of a run
that succeeded; after a failure it is not (the tap sends it again next time, and it is
counted then). A batch is committed with the first STATE that covers any of it, so the
part of it past that STATE may be sent again by the next run; and a tap that re-reads its
last rows (an inclusive replication key) re-sends ids the journal counted. Both are ids of
the stream's last committed batch: those are remembered across runs, and such re-sends are
counted as ``resent``, not again. So a resumed run counts nothing twice.

Size: aggregates and samples, never every id. Many runs may share one file (WAL, a busy
timeout, additive upserts in short transactions); see journal_store.py for the SQL.
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import hashlib
import logging
import random
import threading
import time
import typing as t
import uuid
from dataclasses import dataclass, field

import msgspec

from target_usage_billing.journal_store import EXACT, BucketKey, JournalStore

logger = logging.getLogger("target-usage-billing.journal")

SAMPLE_SIZE = 100  # ids kept per bucket

_body_decoder = msgspec.json.Decoder(float_hook=decimal.Decimal)
_Decimal = decimal.Decimal
_ZERO = decimal.Decimal(0)


class _Discard(list):  # ids of an older batch than the latest: not kept
    def append(self, item: t.Any) -> None:
        pass


_DISCARD: list[str] = _Discard()


@dataclass(frozen=True)
class JournalFields:
    """Where a platform's payload keeps what the journal aggregates (declared by each
    destination): dotted paths, the first present one wins for ``customer``."""

    id: str
    customer: tuple[str, ...]
    meter: str
    time: str
    # objects whose numeric values are summed: (path, keys to sum or None for every key
    # holding a number or a number as text)
    values: tuple[tuple[str, tuple[str, ...] | None], ...] = ()


@dataclass
class _Bucket:
    items: int = 0
    sums: dict[str, decimal.Decimal] = field(default_factory=dict)
    sample: list[tuple[str, str]] = field(default_factory=list)  # (id, body digest)


def digest(body: bytes) -> str:
    """A body's digest as the journal and dead letters keep it (stable across runs)."""
    return hashlib.blake2b(body, digest_size=8).hexdigest()


def _reader(path: str) -> t.Callable[[dict], t.Any]:
    parts = path.split(".")
    if len(parts) == 1:
        return lambda payload: payload.get(path)

    def read(payload: dict) -> t.Any:
        value: t.Any = payload
        for part in parts:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value

    return read


def hour_of(value: t.Any) -> str:
    """The hour of a payload time: canonical UTC text, or Unix seconds (Lago)."""
    if isinstance(value, str):
        if value[:4].isdigit() and len(value) >= 13 and value[10] == "T":
            return value[:13]
        try:
            value = _Decimal(value)
        except decimal.InvalidOperation:
            return "unknown"
    if isinstance(value, (int, _Decimal)) and not isinstance(value, bool):
        try:
            return time.strftime("%Y-%m-%dT%H", time.gmtime(int(value)))
        except (OverflowError, ValueError, OSError):
            return "unknown"
    return "unknown"


def as_number(value: t.Any) -> decimal.Decimal | None:
    """A payload value as an exact number, when it is one (a JSON number or numeric text)."""
    if type(value) is int or type(value) is _Decimal:
        return _Decimal(value)
    if type(value) is str and value and (value[0].isdigit() or value[0] in "-."):
        try:
            number = _Decimal(value)
        except decimal.InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


class Journal:
    """In-memory aggregates of acknowledged usage, committed to a JournalStore by epoch."""

    def __init__(self, store: JournalStore, scope: str, fields: JournalFields, *, run_id: str | None = None):
        self.store = store
        self.scope = scope
        self.run_id = run_id or uuid.uuid4().hex
        self._id = _reader(fields.id)
        self._customers = [_reader(path) for path in fields.customer]
        self._meter = _reader(fields.meter)
        self._time = _reader(fields.time)
        self._values = [(_reader(path), path, keys) for path, keys in fields.values]
        self._lock = threading.Lock()
        # epoch -> bucket key -> _Bucket
        self._epochs: dict[int, dict[BucketKey, _Bucket]] = collections.defaultdict(dict)
        # the ids of each stream's latest batch (by its first record), per epoch and once
        # committed: what a next run may send again
        self._epoch_tails: dict[int, dict[str, tuple[int, list[str]]]] = collections.defaultdict(dict)
        self._committed_tails: dict[str, tuple[int, list[str]]] = {}
        self._known_tail: dict[str, set[str]] = {}
        self._resent: collections.Counter[str] = collections.Counter()
        self._random = random.Random()
        self.committed_items = 0
        self.started_at = _now()
        store.run_started(self.run_id, scope, self.started_at)

    def acknowledged(self, stream: str, bodies: t.Sequence[bytes], epoch: int, first_index: int) -> None:
        """Count the items of an acknowledged request of the batch whose first record has
        index ``first_index`` (called by delivery workers)."""
        payloads = [_body_decoder.decode(body) for body in bodies]
        with self._lock:
            known = self._known_tail.get(stream)
            if known is None:
                known = self._known_tail[stream] = self.store.tail(self.scope, stream)
            buckets = self._epochs[epoch]
            tails = self._epoch_tails[epoch]
            latest = tails.get(stream)
            if latest is None or latest[0] < first_index:
                latest = tails[stream] = (first_index, [])
            tail = latest[1] if latest[0] == first_index else _DISCARD
            for payload, body in zip(payloads, bodies):
                self._count(stream, payload, body, buckets, known, tail)

    def _count(
        self,
        stream: str,
        payload: dict,
        body: bytes,
        buckets: dict[BucketKey, _Bucket],
        known: set[str],
        tail: list[str],
    ) -> None:
        item_id = self._id(payload)
        item_id = "" if item_id is None else str(item_id)
        if known and item_id in known:
            self._resent[stream] += 1
            known.discard(item_id)  # a second re-send within this run would be the ledger's
            return
        tail.append(item_id)
        customer = next((str(c) for c in (read(payload) for read in self._customers) if c is not None), "")
        key = (stream, customer, str(self._meter(payload) or ""), hour_of(self._time(payload)))
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket()
        bucket.items += 1
        sums = bucket.sums
        add = EXACT.add
        for read, path, keys in self._values:
            values = read(payload)
            if not isinstance(values, dict):
                number = as_number(values)
                if number is not None:
                    sums[path] = add(sums.get(path, _ZERO), number)
                continue
            for name in keys if keys is not None else values:
                number = as_number(values.get(name))
                if number is not None:
                    total_key = f"{path}.{name}"
                    sums[total_key] = add(sums.get(total_key, _ZERO), number)
        sample = bucket.sample
        if len(sample) < SAMPLE_SIZE:
            sample.append((item_id, digest(body)))
        else:  # reservoir sampling: every item of the bucket equally likely to be kept
            slot = self._random.randrange(bucket.items)
            if slot < SAMPLE_SIZE:
                sample[slot] = (item_id, digest(body))

    def commit(self, before_epoch: int | None = None) -> None:
        """Write the epochs below ``before_epoch`` (None: all) in one transaction."""
        with self._lock:
            epochs = sorted(e for e in self._epochs if before_epoch is None or e < before_epoch)
            if not epochs and not self._resent:
                return
            merged: dict[BucketKey, _Bucket] = {}
            for epoch in epochs:
                for key, bucket in self._epochs.pop(epoch).items():
                    into = merged.get(key)
                    if into is None:
                        merged[key] = bucket
                        continue
                    into.items += bucket.items
                    for name, value in bucket.sums.items():
                        into.sums[name] = EXACT.add(into.sums.get(name, _ZERO), value)
                    into.sample.extend(bucket.sample[: SAMPLE_SIZE - len(into.sample)])
                for stream, latest in self._epoch_tails.pop(epoch, {}).items():
                    if stream not in self._committed_tails or self._committed_tails[stream][0] <= latest[0]:
                        self._committed_tails[stream] = latest
            resent = dict(self._resent)
            self._resent.clear()
            tails = {stream: ids for stream, (_first, ids) in self._committed_tails.items() if ids}
            self.store.commit(self.scope, self.run_id, merged, resent, tails, _now())
            self.committed_items += sum(bucket.items for bucket in merged.values())

    def finish(self, outcome: str) -> None:
        self.store.run_finished(self.run_id, outcome, _now(), self.committed_items)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
