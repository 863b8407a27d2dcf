"""The sandbox's state: settings, injected faults, stored items per platform, counters.

Shared by the request handlers of ``server.py`` under one lock.
"""

from __future__ import annotations

import collections
import threading
import time
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from target_usage_billing.sandbox.store import Store

DESTINATIONS = ("m3ter", "metronome", "orb", "lago", "openmeter", "stripe")
FAULT_KINDS = (
    "401",
    "403",
    "413",
    "429",
    "500",
    "502",
    "503",
    "504",
    "drop",
    "stored-500",
    "stored-drop",
    "slow",
    "expire-tokens",
    # answers a middlebox gives instead of the platform (nothing is stored)
    "html-200",
    "errors-200",
    "redirect",
    "trickle",  # the platform's answer, its body one byte every delay_ms
    # item faults: they count items, not requests (every=N: every N-th new item of a
    # destination; count=N: the next N), and the request is answered as usual
    "lost-after-ack",  # acknowledged, never stored: the read side does not find it
    "invalid-after-ack",  # stored, then reported invalid through the platform's channel
)
ITEM_FAULTS = ("lost-after-ack", "invalid-after-ack")
# Orb and Lago validate in the request: nothing is reported invalid after their 2xx.
VALIDATES_AFTER_ACK = ("m3ter", "metronome", "openmeter", "stripe")
# the id each destination's stats name an item by (OpenMeter's key is source and id)
ITEM_ID_FIELDS = {
    "m3ter": "uid",
    "metronome": "transaction_id",
    "orb": "idempotency_key",
    "lago": "transaction_id",
    "openmeter": "id",
    "stripe": "identifier",
}
MAX_LISTED_IDS = 100_000  # the stats list this many hit ids; the counters count them all


@dataclass
class SandboxSettings:
    m3ter_access_key_id: str = "sandbox-access-key"
    m3ter_api_secret: str = "sandbox-api-secret"
    metronome_api_token: str = "sandbox-metronome-token"
    orb_api_key: str = "sandbox-orb-key"
    orb_grace_period_hours: float = 12.0
    lago_api_key: str = "sandbox-lago-key"
    openmeter_api_token: str = "sandbox-openmeter-token"  # empty: none needed (self-hosted)
    stripe_api_key: str = "sk_test_sandbox"
    stripe_session_seconds: float = 900.0  # meter event sessions last 15 minutes
    token_lifetime: float = 18000.0
    latency_ms: float = 0.0
    # m3ter: 50 requests/s per organization, 5,000 per rolling 5 minutes per source IP
    m3ter_rate_limits: tuple[tuple[int, float], ...] = ((50, 1.0), (5000, 300.0))
    data_dir: Path = Path(".sandbox-data")
    # items whose JSON contains one of these strings are refused (400), to rehearse
    # content the API rejects although it passed the target's own checks
    refuse_items_containing: list[str] = field(default_factory=list)


@dataclass
class Fault:
    kind: str
    count: int | None = None  # apply to the next N requests (default 1 when every unset)
    every: int | None = None  # or to every N-th request
    retry_after: str | None = None  # 429/503: Retry-After header value
    destination: str | None = None  # m3ter, metronome, or both when None
    delay_ms: float = 0.0  # slow: extra delay
    headers: dict[str, str] = field(default_factory=dict)  # status kinds: extra answer headers
    # None: ingest requests; else only the other requests whose path holds this (Orb's
    # backfill endpoints: "/close", "/v1/events/backfills")
    path: str | None = None
    after: int = 0  # let this many matching requests through first
    # a storm: every matching request for this many seconds from the first one it meets
    seconds: float | None = None
    seen: int = 0
    started: float | None = None  # monotonic time of the storm's first request
    items_seen: dict[str, int] = field(default_factory=dict)  # item faults: per destination

    @classmethod
    def parse(cls, spec: t.Mapping[str, t.Any]) -> Fault:
        kind = str(spec.get("kind", ""))
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (kinds: {', '.join(FAULT_KINDS)})")
        destination = spec.get("destination")
        if destination is not None and destination not in DESTINATIONS:
            raise ValueError(f"unknown destination {destination!r}")
        if kind == "invalid-after-ack" and destination is not None and destination not in VALIDATES_AFTER_ACK:
            raise ValueError(f"{destination} validates in the request: invalid-after-ack does not apply")
        count = spec.get("count")
        every = spec.get("every")
        storm = spec.get("seconds") is not None
        retry_after = spec.get("retry_after")
        return cls(
            kind=kind,
            count=int(count) if count is not None else (None if every or storm else 1),
            every=int(every) if every else None,
            retry_after=str(retry_after) if retry_after is not None else None,
            destination=destination,
            delay_ms=float(spec.get("delay_ms", 0)),
            headers={str(k): str(v) for k, v in dict(spec.get("headers") or {}).items()},
            path=str(spec["path"]) if spec.get("path") else None,
            after=int(spec.get("after", 0)),
            seconds=float(spec["seconds"]) if spec.get("seconds") is not None else None,
        )

    @classmethod
    def parse_cli(cls, text: str) -> Fault:
        """``KIND[:key=value...]``, e.g. ``429:count=3:retry_after=1`` or ``drop:every=50``."""
        kind, *pairs = text.split(":")
        spec: dict[str, t.Any] = {"kind": kind}
        for pair in pairs:
            key, _, value = pair.partition("=")
            spec[key.replace("-", "_")] = value
        return cls.parse(spec)


@dataclass
class DestinationStats:
    requests: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    items_received: int = 0
    accepted: int = 0  # newly stored items
    duplicates: int = 0  # re-sent ids, accepted and not stored again
    conflicts: int = 0  # re-sent ids whose body differs from the stored one
    rejected_requests: int = 0  # 400 answers
    faults_applied: int = 0
    max_items_per_request: int = 0
    max_body_bytes: int = 0
    gzip_requests: int = 0
    max_requests_in_1s: int = 0
    token_requests: int = 0
    read_requests: int = 0  # answered by the read endpoints
    last_error: str | None = None
    lost_after_ack: int = 0  # items acknowledged and not stored (fault lost-after-ack)
    invalid_after_ack: int = 0  # items stored and reported invalid (fault invalid-after-ack)
    lost_ids: list[str | None] = field(default_factory=list)
    invalid_ids: list[str | None] = field(default_factory=list)


def _item_id(destination: str, item: tuple[str | None, bytes]) -> str | None:
    key, raw = item
    if key is not None and destination != "openmeter":
        return key
    value = msgspec.json.decode(raw).get(ITEM_ID_FIELDS[destination])
    return value if isinstance(value, str) else None


class Sandbox:
    """State shared by the request handlers."""

    def __init__(self, settings: SandboxSettings, faults: list[Fault] | None = None):
        self.settings = settings
        self.lock = threading.Lock()
        self.faults: list[Fault] = list(faults or [])
        self.tokens: dict[str, float] = {}
        self.stats = {name: DestinationStats() for name in DESTINATIONS}
        self.stores = {
            "m3ter": Store(settings.data_dir / "m3ter-measurements.jsonl", "uid"),
            "metronome": Store(settings.data_dir / "metronome-events.jsonl", "transaction_id"),
            "orb": Store(settings.data_dir / "orb-events.jsonl", "idempotency_key"),
            "lago": Store(settings.data_dir / "lago-events.jsonl", "transaction_id"),
            "openmeter": Store(settings.data_dir / "openmeter-events.jsonl", ("source", "id")),
            "stripe": Store(settings.data_dir / "stripe-meter-events.jsonl", "identifier"),
        }
        self._arrivals: dict[str, collections.deque[float]] = {
            name: collections.deque() for name in DESTINATIONS
        }
        self.orb_backfills: dict[str, t.Any] = {}  # sandbox/orb_backfills.py
        self.orb_backfills_by_key: dict[str, str] = {}  # Idempotency-Key -> backfill id
        self.generation = 0  # bumped by reset: requests still in flight then are void
        self._rate_windows: list[collections.deque[float]] = [
            collections.deque() for _ in settings.m3ter_rate_limits
        ]

    # --- faults and rates (called with the lock held) ----------------------------------

    def take_fault(self, destination: str, path: str | None = None) -> Fault | None:
        """The fault for the next request: an ingest request (``path`` None), or another
        request of the platform at ``path``, which only faults naming a part of it meet."""
        for fault in list(self.faults):
            if fault.destination not in (None, destination) or fault.kind in ITEM_FAULTS:
                continue
            if fault.path is None:
                if path is not None:
                    continue
            elif path is None or fault.path not in path:
                continue
            fault.seen += 1
            if fault.seen <= fault.after:
                continue
            if fault.seconds is not None:
                now = time.monotonic()
                if fault.started is None:
                    fault.started = now
                if now - fault.started < fault.seconds:
                    return fault
                self.faults.remove(fault)
                continue
            if fault.every:
                if fault.seen % fault.every == 0:
                    return fault
                continue
            if fault.count:
                fault.count -= 1
                if fault.count == 0:
                    self.faults.remove(fault)
                return fault
        return None

    def item_faults(
        self, destination: str, items: list[tuple[str | None, bytes]]
    ) -> tuple[set[int], set[int]]:
        """The positions of the items to lose and to report invalid. Only items the store
        does not hold yet count (a re-sent id is not counted again), in body order."""
        faults = [
            f
            for f in self.faults
            if f.kind in ITEM_FAULTS
            and f.destination in (None, destination)
            and (f.kind == "lost-after-ack" or destination in VALIDATES_AFTER_ACK)
        ]
        hit: dict[str, set[int]] = {kind: set() for kind in ITEM_FAULTS}
        if not faults:
            return hit["lost-after-ack"], hit["invalid-after-ack"]
        index, seen = self.stores[destination].index, set()
        new_positions = []
        for position, (key, _raw) in enumerate(items):
            if key is None or (key not in index and key not in seen):
                new_positions.append(position)
            if key is not None:
                seen.add(key)
        for fault in faults:
            for position in new_positions:
                counted = fault.items_seen[destination] = fault.items_seen.get(destination, 0) + 1
                if fault.every:
                    if counted % fault.every == 0:
                        hit[fault.kind].add(position)
                elif fault.count:
                    fault.count -= 1
                    hit[fault.kind].add(position)
                    if fault.count == 0:
                        self.faults.remove(fault)
                        break
        lost, invalid = hit["lost-after-ack"], hit["invalid-after-ack"] - hit["lost-after-ack"]
        stats = self.stats[destination]
        stats.lost_after_ack += len(lost)
        stats.invalid_after_ack += len(invalid)
        for positions, ids in ((lost, stats.lost_ids), (invalid, stats.invalid_ids)):
            for position in sorted(positions):
                if len(ids) < MAX_LISTED_IDS:
                    ids.append(_item_id(destination, items[position]))
        return lost, invalid

    def note_arrival(self, destination: str) -> None:
        arrivals = self._arrivals[destination]
        now = time.monotonic()
        arrivals.append(now)
        while arrivals and arrivals[0] <= now - 1.0:
            arrivals.popleft()
        stats = self.stats[destination]
        stats.max_requests_in_1s = max(stats.max_requests_in_1s, len(arrivals))

    def m3ter_rate_exceeded(self) -> bool:
        now = time.monotonic()
        exceeded = False
        for (count, seconds), window in zip(self.settings.m3ter_rate_limits, self._rate_windows):
            while window and window[0] <= now - seconds:
                window.popleft()
            if len(window) >= count:
                exceeded = True
        if not exceeded:
            for window in self._rate_windows:
                window.append(now)
        return exceeded

    def reset(self) -> None:
        self.generation += 1
        self.faults.clear()
        self.tokens.clear()
        self.orb_backfills.clear()
        self.orb_backfills_by_key.clear()
        self.settings.latency_ms = 0.0
        self.settings.refuse_items_containing = []
        self.stats = {name: DestinationStats() for name in DESTINATIONS}
        for store in self.stores.values():
            store.clear()
        for arrivals in self._arrivals.values():
            arrivals.clear()
        for window in self._rate_windows:
            window.clear()

    def stats_document(self) -> dict[str, t.Any]:
        out: dict[str, t.Any] = {}
        for name, stats in self.stats.items():
            entry = dict(vars(stats))
            entry["statuses"] = dict(stats.statuses)
            entry["stored"] = self.stores[name].count
            out[name] = entry
        out["faults_pending"] = [vars(f) for f in self.faults]
        return out
