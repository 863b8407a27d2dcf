"""The sandbox's state: settings, injected faults, stored items per platform, counters.

Shared by the request handlers of ``server.py`` under one lock.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

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
)


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
    seen: int = 0

    @classmethod
    def parse(cls, spec: t.Mapping[str, t.Any]) -> Fault:
        kind = str(spec.get("kind", ""))
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (kinds: {', '.join(FAULT_KINDS)})")
        destination = spec.get("destination")
        if destination is not None and destination not in DESTINATIONS:
            raise ValueError(f"unknown destination {destination!r}")
        count = spec.get("count")
        every = spec.get("every")
        retry_after = spec.get("retry_after")
        return cls(
            kind=kind,
            count=int(count) if count is not None else (None if every else 1),
            every=int(every) if every else None,
            retry_after=str(retry_after) if retry_after is not None else None,
            destination=destination,
            delay_ms=float(spec.get("delay_ms", 0)),
            headers={str(k): str(v) for k, v in dict(spec.get("headers") or {}).items()},
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
    last_error: str | None = None


class Store:
    """Accepted items of one destination: a JSONL file plus an index id -> body digest."""

    def __init__(self, path: Path, id_field: str | tuple[str, ...]):
        """``id_field``: the item's id, or the fields that together are its identity
        (OpenMeter: source and id), joined with NUL as the platform module keys them."""
        self.path = path
        self.id_fields = (id_field,) if isinstance(id_field, str) else id_field
        self.index: dict[str, bytes] = {}
        self.count = 0
        self._id_decoder = msgspec.json.Decoder(dict[str, t.Any])
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "rb") as existing:
                for line in existing:
                    if line.strip():
                        self.count += 1
                        document = self._id_decoder.decode(line)
                        parts = [document.get(name) for name in self.id_fields]
                        item_id = "\x00".join(map(str, parts)) if None not in parts else None
                        if item_id is not None:
                            self.index[item_id] = _digest(line.rstrip(b"\n"))
        self._file = open(path, "ab")  # noqa: SIM115 - held open while serving

    def add(self, items: list[tuple[str | None, bytes]], stats: DestinationStats) -> tuple[list, list]:
        """Store the items whose id is new; (new ids, ids already stored)."""
        fresh = []
        new_ids, known_ids = [], []
        for item_id, raw in items:
            if item_id is not None:
                digest = _digest(raw)
                known = self.index.get(item_id)
                if known is not None:
                    stats.duplicates += 1
                    known_ids.append(item_id)
                    if known != digest:
                        stats.conflicts += 1
                    continue
                self.index[item_id] = digest
                new_ids.append(item_id)
            fresh.append(raw)
        if fresh:
            self._file.write(b"\n".join(fresh) + b"\n")
            self._file.flush()
            self.count += len(fresh)
            stats.accepted += len(fresh)
        return new_ids, known_ids

    def dump(self) -> bytes:
        self._file.flush()
        return self.path.read_bytes()

    def clear(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
        self.index.clear()
        self.count = 0
        self._file = open(self.path, "ab")  # noqa: SIM115


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=12).digest()


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
        self.generation = 0  # bumped by reset: requests still in flight then are void
        self._rate_windows: list[collections.deque[float]] = [
            collections.deque() for _ in settings.m3ter_rate_limits
        ]

    # --- faults and rates (called with the lock held) ----------------------------------

    def take_fault(self, destination: str) -> Fault | None:
        for fault in list(self.faults):
            if fault.destination not in (None, destination):
                continue
            fault.seen += 1
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
