"""What the run did, per stream: counted on the record path and by the delivery workers."""

from __future__ import annotations

import collections
import threading
import time
import typing as t
from dataclasses import dataclass, field

# distinct rejection reasons kept per stream and mapping (the summary shows the top ones)
MAX_REASONS = 100
OTHER_REASONS = f"other reasons (past the first {MAX_REASONS} distinct ones)"
MAPPING = 3  # delivery.Item's mapping label (not imported: delivery imports this module)


@dataclass
class MappingStats:
    """One mapping's share of a stream that several mappings bill (fan-out)."""

    filtered: int = 0
    mapped: int = 0
    duplicates: int = 0
    sent: int = 0
    already_stored: int = 0
    rejected: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)


@dataclass
class StreamStats:
    read: int = 0  # records received
    filtered: int = 0  # dropped by the rule's filter
    unmapped: int = 0  # the stream's rule says skip (or, when allowed, no rule matches)
    mapped: int = 0  # became a payload, buffered for sending
    duplicates: int = 0  # same id and body as an item already sent in this run: not re-sent
    sent: int = 0  # acknowledged by the API (or written by a dry run)
    already_stored: int = 0  # refused by the API as already stored (an earlier run sent it)
    rejected: int = 0  # dead-lettered, any stage
    rejected_by_api: int = 0  # of those, refused by the API (they were counted as mapped too)
    outside_window: int = 0  # of those, outside the platform's time window (refused locally)
    skipped_beyond_window: int = 0  # not sent again: acknowledged before the platform's window
    resent_beyond_window: int = 0  # ids re-sent after the platform's de-duplication window (forced)
    channelled: int = 0  # of those sent, sent another way than the live ingest (Orb backfills)
    requests: int = 0  # ingest requests for this stream (bisecting included)
    retries: int = 0  # requests sent again after a transient failure
    reasons: collections.Counter = field(default_factory=collections.Counter)
    # by mapping label, in order, when several mappings fire on the stream (else empty):
    # the stream's filtered .. rejected are then the sums over its mappings' payloads
    mappings: dict[str, MappingStats] = field(default_factory=dict)


class RunStats:
    """Counters shared by the reading thread and the delivery workers."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.streams: dict[str, StreamStats] = {}
        self.lock = threading.Lock()

    def stream(self, name: str) -> StreamStats:
        found = self.streams.get(name)
        if found is None:
            with self.lock:
                found = self.streams.setdefault(name, StreamStats())
        return found

    def add_sent(self, stream: str, count: int, items: t.Sequence[tuple] = ()) -> None:
        """``count`` items acknowledged; ``items`` (delivery.Item) say by which mapping."""
        with self.lock:
            entry = self.streams[stream]
            entry.sent += count
            if entry.mappings:
                for item in items:
                    entry.mappings[item[MAPPING]].sent += 1

    def add_already_stored(self, stream: str, mapping: str | None = None, count: int = 1) -> None:
        with self.lock:
            entry = self.streams[stream]
            entry.already_stored += count
            if mapping in entry.mappings:
                entry.mappings[mapping].already_stored += count

    def add_channelled(self, stream: str, count: int) -> None:
        with self.lock:
            self.streams[stream].channelled += count

    def add_request(self, stream: str) -> None:
        with self.lock:
            self.streams[stream].requests += 1

    def add_retry(self, stream: str) -> None:
        with self.lock:
            self.streams[stream].retries += 1

    def add_rejected(self, stream: str, stage: str, reason: str, mapping: str | None = None) -> None:
        with self.lock:
            entry = self.streams[stream]
            entry.rejected += 1
            if stage == "api":
                entry.rejected_by_api += 1
            why = f"{stage}: {_generic(reason)}"
            _count_reason(entry.reasons, why)
            if mapping in entry.mappings:
                share = entry.mappings[mapping]
                share.rejected += 1
                _count_reason(share.reasons, why)

    def total(self, attribute: str) -> int:
        with self.lock:
            return sum(getattr(s, attribute) for s in self.streams.values())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _generic(reason: str) -> str:
    # Group reasons that differ only in the offending value, so the top-N stays readable.
    cut = reason.split(", got ", 1)[0]
    if cut.startswith("id ") and " was already sent in this run with a different body" in cut:
        cut = "an id already sent in this run with a different body"  # one reason, not one an id
    return cut if len(cut) <= 120 else cut[:117] + "..."


def _count_reason(reasons: collections.Counter[str], why: str) -> None:
    # memory bounded whatever the run: reasons past the first MAX_REASONS are counted together
    if why not in reasons and len(reasons) >= MAX_REASONS:
        why = OTHER_REASONS
    reasons[why] += 1
