"""What the sandbox stores of one destination: the accepted items, as sent, in a JSONL file."""

from __future__ import annotations

import bisect
import hashlib
import math
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

import msgspec

if t.TYPE_CHECKING:
    from target_usage_billing.sandbox.state import DestinationStats


@dataclass
class Stored:
    """One stored item, as the read side sees it."""

    raw: bytes
    received_at: float  # epoch seconds of the request that stored it
    invalid: bool  # reported invalid after the acknowledgement


class Store:
    """Accepted items of one destination: a JSONL file plus an index id -> body digest
    and the item's offset in the file (so the read side finds an id without a scan)."""

    def __init__(self, path: Path, id_field: str | tuple[str, ...]):
        """``id_field``: the item's id, or the fields that together are its identity
        (OpenMeter: source and id), joined with NUL as the platform module keys them."""
        self.path = path
        self.id_fields = (id_field,) if isinstance(id_field, str) else id_field
        self.index: dict[str, bytes] = {}  # id -> 12-byte digest + 8-byte offset
        self.count = 0
        self.size = 0  # bytes in the file
        # (offset of a request's first item, when it arrived): one entry per request
        self.batches: list[tuple[int, float]] = []
        self.invalid: set[int] = set()  # offsets of items reported invalid after the 2xx
        self._id_decoder = msgspec.json.Decoder(dict[str, t.Any])
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "rb") as existing:
                for line in existing:
                    offset, self.size = self.size, self.size + len(line)
                    if line.strip():
                        self.count += 1
                        item_id = self._id_of(self._id_decoder.decode(line))
                        if item_id is not None:
                            self.index[item_id] = _digest(line.rstrip(b"\n")) + offset.to_bytes(8, "big")
            if self.size:  # the arrival times of a previous run are not kept
                self.batches.append((0, path.stat().st_mtime))
        self._file = open(path, "ab")  # noqa: SIM115 - held open while serving

    def _id_of(self, document: dict[str, t.Any]) -> str | None:
        parts = [document.get(name) for name in self.id_fields]
        return "\x00".join(map(str, parts)) if None not in parts else None

    def add(
        self,
        items: list[tuple[str | None, bytes]],
        stats: DestinationStats,
        lost: t.Container[int] = (),
        invalid: t.Container[int] = (),
    ) -> tuple[list, list]:
        """Store the items whose id is new; (new ids, ids already stored). The items at
        the positions ``lost`` count as new and are not stored; those at ``invalid`` are
        stored and marked invalid."""
        fresh = []
        new_ids, known_ids = [], []
        offset = self.size
        first = offset
        for position, (item_id, raw) in enumerate(items):
            if position in lost:
                if item_id is not None:
                    new_ids.append(item_id)
                continue
            if item_id is not None:
                digest = _digest(raw)
                known = self.index.get(item_id)
                if known is not None:
                    stats.duplicates += 1
                    known_ids.append(item_id)
                    if known[:12] != digest:
                        stats.conflicts += 1
                    continue
                self.index[item_id] = digest + offset.to_bytes(8, "big")
                new_ids.append(item_id)
            if position in invalid:
                self.invalid.add(offset)
            fresh.append(raw)
            offset += len(raw) + 1
        if fresh:
            self.batches.append((first, time.time()))
            self._file.write(b"\n".join(fresh) + b"\n")
            self._file.flush()
            self.size = offset
            self.count += len(fresh)
            stats.accepted += len(fresh)
        return new_ids, known_ids

    def get(self, item_id: str) -> Stored | None:
        """The stored item with this id (for OpenMeter: "source\\0id")."""
        entry = self.index.get(item_id)
        if entry is None:
            return None
        offset = int.from_bytes(entry[12:], "big")
        with open(self.path, "rb") as stored:
            stored.seek(offset)
            raw = stored.readline().rstrip(b"\n")
        return Stored(raw, self._received_at(offset), offset in self.invalid)

    def scan(self) -> t.Iterator[Stored]:
        """Every stored item, in the order stored."""
        self._file.flush()
        offset = 0
        with open(self.path, "rb") as stored:
            for line in stored:
                if line.strip():
                    yield Stored(line.rstrip(b"\n"), self._received_at(offset), offset in self.invalid)
                offset += len(line)

    def _received_at(self, offset: int) -> float:
        index = bisect.bisect_right(self.batches, (offset, math.inf)) - 1
        return self.batches[index][1] if index >= 0 else time.time()

    def discard(self, unwanted: t.Callable[[bytes], bool]) -> list[bytes]:
        """Remove the items ``unwanted`` says so of (Orb's backfills replace and revert
        events): the file is written again without them. Gives what was removed."""
        kept: list[bytes] = []
        removed: list[bytes] = []
        for item in list(self.scan()):
            (removed if unwanted(item.raw) else kept).append(item.raw)
        if removed:
            self.clear()
            self._file.write(b"".join(raw + b"\n" for raw in kept))
            self._file.flush()
            for raw in kept:
                item_id = self._id_of(self._id_decoder.decode(raw))
                if item_id is not None:
                    self.index[item_id] = _digest(raw) + self.size.to_bytes(8, "big")
                self.size += len(raw) + 1
                self.count += 1
            self.batches.append((0, time.time()))
        return removed

    def dump(self) -> bytes:
        self._file.flush()
        return self.path.read_bytes()

    def clear(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
        self.index.clear()
        self.count = 0
        self.size = 0
        self.batches.clear()
        self.invalid.clear()
        self._file = open(self.path, "ab")  # noqa: SIM115


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=12).digest()
