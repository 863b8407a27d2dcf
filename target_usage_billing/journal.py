"""The run journal: what each platform acknowledged, kept before the STATE that covers it.

Per platform account ("scope"), stream, customer, meter (event name) and UTC hour of usage:
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
timeout, additive upserts in short transactions); see journal_store.py for the SQL. In
memory: at most HELD_ENTRIES buckets and sampled ids not yet committed; past that they
are spilled to a private temporary file (journal_spill.py) until their STATE commits them.
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import heapq
import itertools
import json
import logging
import random
import threading
import typing as t
import uuid
from dataclasses import dataclass, field

from target_usage_billing.journal_spill import Spill, added_up
from target_usage_billing.journal_store import EXACT, BucketKey, JournalStore
from target_usage_billing.journal_tally import (
    BUCKETS_REMEMBERED,
    SAMPLE_RATE,
    SAMPLE_SIZE,
    JournalFields,
    Layout,
    Tally,
    _body_decoder,
)

__all__ = ["SAMPLE_RATE", "SAMPLE_SIZE", "Journal", "JournalFields", "Recount", "Tally"]

logger = logging.getLogger("target-usage-billing.journal")

# Buckets and sampled ids not yet committed that memory holds (about 1 KB a bucket and
# 200 bytes an id, so some tens of MB); past it, they are spilled (journal_spill.py).
HELD_ENTRIES = 50_000


@dataclass
class _Epoch:
    """What was acknowledged of the batches of one epoch, not yet committed."""

    # per bucket: [items, {field: exact total}]
    buckets: dict[BucketKey, list] = field(default_factory=dict)
    samples: dict[BucketKey, list[tuple[str, str]]] = field(default_factory=dict)
    # per stream: (first record index of its latest batch, that batch's ids)
    tails: dict[str, tuple[int, list[str]]] = field(default_factory=dict)


class Journal:
    """In-memory aggregates of acknowledged usage, committed to a JournalStore by epoch."""

    def __init__(
        self,
        store: JournalStore,
        scope: str,
        fields: JournalFields,
        *,
        sample_rate: float = SAMPLE_RATE,
        run_id: str | None = None,
        held_entries: int = HELD_ENTRIES,
    ):
        self.store = store
        self.scope = scope
        self.run_id = run_id or uuid.uuid4().hex
        self._layout = Layout(fields)  # the payload's paths, compiled
        self._lock = threading.Lock()
        self._epochs: dict[int, _Epoch] = collections.defaultdict(_Epoch)
        self._merged: list[tuple[int, int]] = []  # epochs [low, high) kept as epoch high - 1
        self._committed_tails: dict[str, tuple[int, list[str]]] = {}
        self._known_tail: dict[str, set[str]] = {}  # per stream, loaded from the store once
        self._resent: collections.Counter[str] = collections.Counter()
        self._first_sampled: set[BucketKey] = set()  # buckets whose first id of the run is sampled
        self._schemes: dict[str, str] = {}  # key properties of streams, written at the next commit
        self._random = random.Random()
        self._sample_rate = sample_rate
        self._held = 0  # buckets and sampled ids in self._epochs (at most: merging may join some)
        self._held_entries = held_entries
        self._spill = Spill()
        self.committed_items = 0
        self.acknowledged_items = 0  # counted in memory (committed or not yet)
        store.run_started(self.run_id, scope, _now())

    def acknowledged(self, stream: str, item_bodies: t.Sequence[bytes], epoch: int, first_index: int) -> None:
        """Count delivered items from their bodies: a part of a split batch, or a batch
        holding ids the last run counted (sent again: counted as ``resent``)."""
        known = self._known(stream)
        tally = Tally(self._layout, stream)
        read_id = self._layout.read_id
        resent = 0
        counted = []
        for body in item_bodies:
            payload = _body_decoder.decode(body)
            item_id = read_id(payload)
            if known and str(item_id) in known:
                resent += 1
                known.discard(str(item_id))  # a second re-send within this run is the ledger's
                continue
            tally.add(payload, body)
            counted.append(body)
        with self._lock:
            # a part of a batch: its own first ids are sampled (the batch's may be elsewhere)
            tally.settle(counted, set(), self._sample_rate, self._random)
            self._take(stream, tally, epoch, first_index, resent)

    def tally(self, stream: str) -> Tally:
        """A new batch's tally (see Tally): the sink files each item it buffers."""
        return Tally(self._layout, stream)

    def seal(self, tally: Tally, bodies: t.Sequence[bytes]) -> None:
        """Settle a batch's tally as it is handed over (``bodies``: its items' bodies), in
        input order, so the first id of each bucket sampled is the run's first."""
        with self._lock:
            tally.settle(bodies, self._first_sampled, self._sample_rate, self._random)
            if len(self._first_sampled) > BUCKETS_REMEMBERED:  # bounded: a bucket seen again
                self._first_sampled.clear()  # has its first id sampled again (the store keeps 100)

    def acknowledged_tally(self, stream: str, tally: Tally, epoch: int, first_index: int) -> None:
        """Take the sealed tally of a batch delivered whole (called by delivery workers);
        Recount when it holds ids the last run counted (then ``acknowledged`` sorts them
        out)."""
        known = self._known(stream)
        if known and not known.isdisjoint(tally.ids):
            raise Recount
        with self._lock:
            self._take(stream, tally, epoch, first_index, 0)

    def known_tail(self, stream: str) -> set[str]:
        """The ids of ``stream``'s last batch an earlier run committed, not yet re-sent."""
        return self._known(stream)

    def _known(self, stream: str) -> set[str]:
        with self._lock:
            known = self._known_tail.get(stream)
            if known is None:
                known = self._known_tail[stream] = self.store.tail(self.scope, stream)
            return known

    def _take(self, stream: str, tally: Tally, epoch: int, first_index: int, resent: int) -> None:
        """Add a settled tally to its epoch (the caller holds the lock)."""
        scheme = self._schemes.pop(stream, None)
        if scheme is not None:  # the stream's first acknowledgement: its id scheme is used now,
            # whether or not a STATE ever follows (a run killed before its first STATE billed it)
            self.store.commit(self.scope, self.run_id, (), (), {}, {}, _now(), {stream: scheme}, ())
        self._resent[stream] += resent
        for low, high in self._merged:  # an epoch kept with others (merge_epochs)
            if low <= epoch < high:
                epoch = high - 1
        bucket = self._epochs[epoch]
        _keep_tail(bucket.tails, stream, first_index, tally.ids)
        held = len(bucket.buckets)
        tally.add_into(bucket.buckets)
        held = len(bucket.buckets) - held
        samples = bucket.samples
        for key, sample in tally.samples.items():
            into = samples.get(key)
            if into is None:
                samples[key] = sample
                held += len(sample)
            else:
                added = sample[: SAMPLE_SIZE - len(into)]
                into.extend(added)
                held += len(added)
        self.acknowledged_items += len(tally.ids)
        self._held += held
        if self._held > self._held_entries:
            self._spill_held()

    def _spill_held(self) -> None:
        """Move the buckets and samples of every epoch out of memory (tails stay)."""
        for number, epoch in self._epochs.items():
            if epoch.buckets or epoch.samples:
                self._spill.add(number, epoch.buckets, epoch.samples)
                epoch.buckets, epoch.samples = {}, {}
        self._held = 0

    def commit(self, before_epoch: int | None = None) -> None:
        """Write the epochs below ``before_epoch`` (None: all) in one transaction."""
        with self._lock:
            epochs = sorted(e for e in self._epochs if before_epoch is None or e < before_epoch)
            if before_epoch is not None:
                self._merged = [(low, high) for low, high in self._merged if high > before_epoch]
            spilled = self._spill.holds(before_epoch)
            if not epochs and not self._resent and not self._schemes and not spilled:
                return
            merged = _Epoch()
            changed: set[str] = set()  # streams whose tail this commit moves
            for number in epochs:
                epoch = self._epochs.pop(number)
                _add_up(merged, epoch)
                for stream, latest in epoch.tails.items():
                    committed = self._committed_tails.get(stream)
                    if committed is None or committed[0] <= latest[0]:
                        self._committed_tails[stream] = latest
                        if latest[1]:  # re-sent ids are not in it: an empty tail keeps the old
                            changed.add(stream)
            resent = dict(self._resent)
            self._resent.clear()
            # only the tails this commit moves: the others are in the store as they are
            tails = {stream: ids for stream in changed if (ids := self._committed_tails[stream][1])}
            schemes, self._schemes = self._schemes, {}
            held = sorted(
                ((key, items, totals) for key, (items, totals) in merged.buckets.items()), key=_bucket_key
            )
            # what memory holds and what was spilled (if anything), in key order, each key once
            counted = _Counted(_joined(held, self._spill.buckets(before_epoch)))
            samples = _joined_samples(merged.samples, self._spill.samples(before_epoch))
            self.store.commit(
                self.scope, self.run_id, counted, samples, resent, tails, _now(), schemes, changed
            )
            self._spill.committed(before_epoch)
            self._held = sum(_entries(epoch) for epoch in self._epochs.values())
            self.committed_items += counted.items

    def merge_epochs(self, low: int | None, high: int) -> None:
        """The epochs from ``low`` (None: the first) below ``high`` will be committed
        together, by the STATE numbered ``high``: they are kept as one, so while STATEs
        cannot go out (a batch retrying, Orb's backfills until the run ends) memory holds
        a few epochs' aggregates, not one set per STATE received."""
        floor = -1 if low is None else low
        with self._lock:
            # later parts of a batch of these epochs go where the rest of it is (its tail)
            self._merged = [(a, b) for a, b in self._merged if not floor <= a < high] + [(floor, high)]
            # spilled epochs are left as they are: in [low, high) too, they are read by the
            # commit of STATE high (or a later one) and by none before it
            numbers = sorted(n for n in self._epochs if floor <= n < high)
            if not numbers:
                return
            # the others into the first (what earlier calls kept): in order, so that each
            # bucket's first sampled ids stay ahead of later ones (at most SAMPLE_SIZE kept)
            into = self._epochs.pop(numbers[0])
            for number in numbers[1:]:
                epoch = self._epochs.pop(number)
                _add_up(into, epoch)
                for stream, (first_index, ids) in epoch.tails.items():
                    _keep_tail(into.tails, stream, first_index, ids)
            if into.buckets or into.samples or into.tails:
                self._epochs[high - 1] = into

    def remembered_keys(self, stream: str) -> list[str] | None:
        """The key properties an earlier run derived ``stream``'s ids from (None: unknown)."""
        with self._lock:
            pending = self._schemes.get(stream)
        scheme = pending if pending is not None else self.store.id_scheme(self.scope, stream)
        return None if scheme is None else json.loads(scheme)

    def remember_keys(self, stream: str, keys: t.Sequence[str]) -> None:
        """Keep ``stream``'s key properties for later runs (written when the platform first
        acknowledges its usage, or with the next commit)."""
        with self._lock:
            self._schemes[stream] = json.dumps(list(keys))

    def finish(self, outcome: str) -> None:
        with self._lock:  # a late acknowledgement spills nothing more
            self._spill.close()  # what it holds was never committed: the file goes
        self.store.run_finished(self.run_id, outcome, _now(), self.committed_items)


class Recount(Exception):
    """A tally that cannot be taken as it is: its items are counted one by one."""


def _keep_tail(
    tails: dict[str, tuple[int, list[str]]], stream: str, first_index: int, ids: t.Iterable[str]
) -> None:
    """Keep the ids of ``stream``'s latest batch (the parts of a split batch together)."""
    latest = tails.get(stream)
    if latest is None or latest[0] < first_index:
        tails[stream] = (first_index, list(ids))
    elif latest[0] == first_index:  # another part of a split batch
        latest[1].extend(ids)


def _add_up(into: _Epoch, epoch: _Epoch) -> None:
    """Add ``epoch``'s counts, exact sums and samples into ``into`` (not its tails)."""
    with decimal.localcontext(EXACT):
        for key, (items, totals) in epoch.buckets.items():
            kept = into.buckets.get(key)
            if kept is None:
                into.buckets[key] = [items, totals]
                continue
            kept[0] += items
            for name, total in totals.items():
                kept[1][name] = kept[1].get(name, 0) + total
    for key, sample in epoch.samples.items():
        found = into.samples.setdefault(key, [])
        found.extend(sample[: SAMPLE_SIZE - len(found)])


def _entries(epoch: _Epoch) -> int:
    return len(epoch.buckets) + sum(map(len, epoch.samples.values()))


def _joined(
    held: t.Iterable[tuple[BucketKey, int, dict]], spilled: t.Iterable[tuple[BucketKey, int, dict]]
) -> t.Iterator[tuple[BucketKey, int, dict]]:
    """Two key-ordered runs of buckets (each key once in each) as one, each key once."""
    return added_up(heapq.merge(held, spilled, key=_bucket_key))


def _joined_samples(
    held: t.Mapping[BucketKey, list[tuple[str, str]]], spilled: t.Iterable[tuple[BucketKey, str, str]]
) -> t.Iterator[tuple[BucketKey, str, str]]:
    """The sampled ids of each bucket in key order, each bucket's by id: at most SAMPLE_SIZE,
    the first that came, spilled ones (as they came) before held ones (they came after: a
    spill takes all), so that a spill keeps what memory alone would."""
    in_memory = ((key, item_id, item_digest) for key in sorted(held) for item_id, item_digest in held[key])
    merged = heapq.merge(spilled, in_memory, key=_sample_key)  # ties: spilled first
    for _key, rows in itertools.groupby(merged, key=_sample_key):
        yield from sorted(itertools.islice(rows, SAMPLE_SIZE))


def _sample_key(sample: tuple[BucketKey, str, str]) -> BucketKey:
    return sample[0]


def _bucket_key(bucket: tuple[BucketKey, int, dict]) -> BucketKey:
    return bucket[0]


class _Counted:
    """Buckets passed on as they are read, their items counted."""

    def __init__(self, buckets: t.Iterable[tuple[BucketKey, int, dict]]):
        self._buckets = buckets
        self.items = 0

    def __iter__(self) -> t.Iterator[tuple[BucketKey, int, dict]]:
        for bucket in self._buckets:
            self.items += bucket[1]
            yield bucket


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
