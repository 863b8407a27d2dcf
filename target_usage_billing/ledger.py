"""The ids sent in this run, to tell a harmless re-send from two events sharing one id.

A billing platform keeps the first item it receives with a given id and silently drops
every later one. When a later item with the same id carries a *different* body, that
is a different usage event (or a correction) the platform would lose: the run
dead-letters it instead of sending it. An identical body is the same event sent twice
(a tap re-reading a boundary row, Segment retrying): it is skipped and counted.

Memory stays small on long runs: each id is kept as two 64-bit hashes in an
open-addressing table (16 bytes a slot, at most two thirds full: about 24 bytes an id),
never as a string. The hashes are Python's (salted per process), so the digests in a
conflict's dead letter compare bodies within one run only. Two different ids sharing a
64-bit hash would be a false conflict: for ten million ids, about 3 chances in a million
per run, and the record is dead-lettered, not lost.
"""

from __future__ import annotations

import enum
from array import array


class Seen(enum.Enum):
    NEW = "new"  # first time this id is sent in this run
    DUPLICATE = "duplicate"  # same id, same body: already sent
    CONFLICT = "conflict"  # same id, different body: the platform would drop it


class IdLedger:
    """Remembers ``(hash(id), hash(body))`` for every id sent in this run."""

    def __init__(self, capacity: int = 1 << 15):
        size = 1
        while size < capacity:
            size <<= 1
        self._new_table(size)
        self.count = 0

    def _new_table(self, size: int) -> None:
        self._size = size
        self._limit = size * 2 // 3
        # slot i is (_slots[2i], _slots[2i+1]) = (id hash, body hash); an id hash of 0 is free
        self._slots = array("q", bytes(16 * size))

    @staticmethod
    def _key(item_id: str) -> int:
        return hash(item_id) or 1  # 0 marks a free slot

    def check(self, item_id: str, body: bytes) -> tuple[Seen, int]:
        """Record ``item_id`` with ``body``; says whether it was seen, and the first body's hash."""
        key = self._key(item_id)
        value = hash(body)
        slots = self._slots
        span = 2 * self._size - 1
        i = (key << 1) & span
        while True:
            found = slots[i]
            if found == 0:
                slots[i] = key
                slots[i + 1] = value
                self.count += 1
                if self.count > self._limit:
                    self._grow()
                return Seen.NEW, value
            if found == key:
                first = slots[i + 1]
                return (Seen.DUPLICATE if first == value else Seen.CONFLICT), first
            i = (i + 2) & span

    def _grow(self) -> None:
        old = self._slots
        self._new_table(self._size * 2)
        slots = self._slots
        span = 2 * self._size - 1
        for j in range(0, len(old), 2):
            key = old[j]
            if key:
                i = (key << 1) & span
                while slots[i]:
                    i = (i + 2) & span
                slots[i] = key
                slots[i + 1] = old[j + 1]

    @property
    def memory_bytes(self) -> int:
        return self._slots.itemsize * len(self._slots)
