"""The ids sent in this run, to tell a harmless re-send from two events sharing one id.

A billing platform keeps the first item it receives with a given id and silently drops
every later one. When a later item with the same id carries a *different* body, that
is a different usage event (or a correction) the platform would lose: the run
dead-letters it instead of sending it. An identical body is the same event sent twice
(a tap re-reading a boundary row, Segment retrying): it is skipped and counted.

Memory stays small on long runs: each id is kept as two 64-bit hashes in an
open-addressing table (16 bytes a slot, at most two thirds full; it grows fourfold up to
1.4 million ids, then twofold: 24 to 96 bytes an id, then 24 to 48; 28 at 300k ids),
never as a string. The hashes are Python's (salted per process), so the digests in a
conflict's dead letter compare bodies within one run only. Two different ids sharing a
64-bit hash would be a false conflict: for ten million ids, about 3 chances in a million
per run, and the record is dead-lettered, not lost.
"""

from __future__ import annotations

from array import array

# What check() says about an id (plain ints: this runs once per record).
NEW = 0  # first time this id is sent in this run
DUPLICATE = 1  # same id, same body: already sent
CONFLICT = 2  # same id, different body: the platform would drop it


QUADRUPLE_BELOW = 1 << 21  # slots (32 MB)


class IdLedger:
    """Remembers ``(hash(id), hash(body))`` for every id sent in this run."""

    def __init__(self, capacity: int = 1 << 15):
        size = 1
        while size < capacity:
            size <<= 1
        self._new_table(size)
        self.count = 0
        self.first_body_hash = 0  # after a DUPLICATE or CONFLICT: the hash of the first body

    def _new_table(self, size: int) -> None:
        self._size = size
        self._limit = size * 2 // 3
        self._span = 2 * size - 1  # slot i is (_slots[2i], _slots[2i+1]): (id hash, body hash)
        self._slots = array("q", bytes(16 * size))

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
        slots[i] = key
        slots[i + 1] = hash(body)
        self.count += 1
        if self.count > self._limit:
            self._grow()
        return NEW

    def _grow(self) -> None:
        old = self._slots
        # Rehashing is a Python loop over every slot: grow fourfold while the table is
        # small (a few MB), so that a run of 300k ids rehashes twice rather than four times.
        self._new_table(self._size * (4 if self._size < QUADRUPLE_BELOW else 2))
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
    def memory_bytes(self) -> int:
        return self._slots.itemsize * len(self._slots)
