"""The ids sent in this run, to tell a harmless re-send from two events sharing one id.

A billing platform keeps the first item it receives with a given id and silently drops
every later one. When a later item with the same id carries a *different* body, that
is a different usage event (or a correction) the platform would lose: the run
dead-letters it instead of sending it. An identical body is the same event sent twice
(a tap re-reading a boundary row, Segment retrying): it is skipped and counted.

Memory is bounded by design, whatever the run's length: the ledger never holds more than
``max_bytes`` (the ``id_ledger_megabytes`` setting, default 64). Each id is kept as two
64-bit hashes in an open-addressing table (16 bytes a slot, at most two thirds full),
never as a string. The table grows (fourfold while small, then twofold) up to half the
budget; once that generation is full it becomes the *old* generation (the one before it
is dropped) and a new one of the same size starts. Lookups see both generations: the
most recent ``remembered`` ids at least (1.4 million with 64 MB), up to twice that, are
checked; older ids have left the ledger. A re-send of such an id is sent again (the
platform de-duplicates it), and a second body for it is not caught at all: the run
journal keeps aggregates and samples, not every id (the README's Ids section says what
it does recognise).

The hashes are Python's (salted per process), so the digests in a conflict's dead letter
compare bodies within one run only. Two different ids sharing a 64-bit hash would be a
false conflict: for ten million ids, about 3 chances in a million per run, and the
record is dead-lettered, not lost.
"""

from __future__ import annotations

from array import array

# What check() says about an id (plain ints: this runs once per record).
NEW = 0  # first time this id is sent in this run
DUPLICATE = 1  # same id, same body: already sent
CONFLICT = 2  # same id, different body: the platform would drop it

SLOT_BYTES = 16
QUADRUPLE_BELOW = 1 << 21  # slots (32 MB)
DEFAULT_MAX_BYTES = 64 * 2**20
_ZERO = array("q", [0])


class IdLedger:
    """Remembers ``(hash(id), hash(body))`` for the most recent ids sent in this run."""

    def __init__(self, capacity: int = 1 << 15, max_bytes: int = DEFAULT_MAX_BYTES):
        # one generation may use half the budget: two of them at most exist at once,
        # and while the first grows, its old and new tables together stay under it too
        self._max_slots = _power_of_two_at_most(max(max_bytes // 2 // SLOT_BYTES, 1024))
        size = 1
        while size < min(capacity, self._max_slots):
            size <<= 1
        self._new_table(size)
        self._old: array | None = None  # the previous generation, when there is one
        self._old_span = 0
        self.count = 0  # ids recorded in this run (also those that left the ledger)
        self._in_table = 0
        self.first_body_hash = 0  # after a DUPLICATE or CONFLICT: the hash of the first body

    def _new_table(self, size: int) -> None:
        self._size = size
        self._limit = size * 2 // 3
        self._span = 2 * size - 1  # slot i is (_slots[2i], _slots[2i+1]): (id hash, body hash)
        # one allocation, filled in C: array("q", bytes(n)) would hold a zeroed copy too
        self._slots = _ZERO * (2 * size)

    def check(self, item_id: str, body: bytes) -> int:
        """Record ``item_id`` with ``body``: NEW, DUPLICATE or CONFLICT."""
        key = hash(item_id) or 1  # an id hash of 0 marks a free slot
        slots = self._slots
        span = self._span
        i = (key << 1) & span
        found = slots[i]
        while found:
            if found == key:
                first = self.first_body_hash = slots[i + 1]
                return DUPLICATE if first == hash(body) else CONFLICT
            i = (i + 2) & span
            found = slots[i]
        old = self._old
        if old is not None:
            old_span = self._old_span
            j = (key << 1) & old_span
            found = old[j]
            while found:
                if found == key:
                    first = self.first_body_hash = old[j + 1]
                    return DUPLICATE if first == hash(body) else CONFLICT
                j = (j + 2) & old_span
                found = old[j]
        slots[i] = key
        slots[i + 1] = hash(body)
        self.count += 1
        self._in_table += 1
        if self._in_table > self._limit:
            old = None  # this frame must not keep the generation _grow() drops
            self._grow()
        return NEW

    def _grow(self) -> None:
        if self._size >= self._max_slots:
            # the generation is full: it becomes the old one, and the ids of the one
            # before it leave the ledger (dropped before the new table is made)
            self._old = None
            self._old, self._old_span = self._slots, self._span
            self._new_table(self._size)
            self._in_table = 0
            return
        old = self._slots
        # Rehashing is a Python loop over every slot: grow fourfold while the table is
        # small (a few MB), so that a run of 300k ids rehashes twice rather than four times.
        factor = 4 if self._size < QUADRUPLE_BELOW else 2
        self._new_table(min(self._size * factor, self._max_slots))
        slots = self._slots
        span = self._span
        # keys and body hashes as two strided copies (C speed), then one loop over pairs:
        # the rehash costs about a third of an index-by-index walk
        for key, body_hash in zip(old[0::2], old[1::2]):
            if key:
                i = (key << 1) & span
                while slots[i]:
                    i = (i + 2) & span
                slots[i] = key
                slots[i + 1] = body_hash

    @property
    def remembered(self) -> int:
        """How many of the most recent ids are always checked (one full generation)."""
        return self._max_slots * 2 // 3

    @property
    def memory_bytes(self) -> int:
        old = self._old
        return self._slots.itemsize * (len(self._slots) + (len(old) if old is not None else 0))

    @property
    def max_bytes(self) -> int:
        """What the ledger can ever hold at once, growth steps included."""
        return 2 * SLOT_BYTES * self._max_slots


def _power_of_two_at_most(n: int) -> int:
    size = 1
    while size * 2 <= n:
        size <<= 1
    return size
