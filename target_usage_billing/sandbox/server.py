"""usage-billing-sandbox: a loopback emulator of the m3ter and Metronome ingest APIs.

It checks credentials, enforces the contracts (limits, per-item validation, time
windows, rate limits), de-duplicates by id, stores what it accepted under a data
directory, and reports what it saw. Faults can be injected from the command line or
the control endpoint, to rehearse outages before they happen in production.

Control endpoints (all under /_sandbox):
  GET  /health                   {"ok": true}
  GET  /stats                    counters per destination
  GET  /items/{m3ter|metronome}  accepted items, one JSON object per line
  POST /faults                   {"faults": [FAULT, ...], "latency_ms": N, "token_lifetime": S,
                                  "refuse_items_containing": [TEXT, ...]}
  DELETE /faults                 clear faults and latency
  GET  /tokens                   the m3ter tokens issued so far
  POST /expire-tokens            every issued m3ter token expires now
  POST /reset                    forget everything (items, stats, faults, tokens)
A FAULT is {"kind": K, "count": N, "every": N, "retry_after": S, "destination": D,
"headers": {NAME: VALUE}} with
K one of 401, 403, 429, 500, 502, 503, 504, drop, stored-500, stored-drop, slow (uses "delay_ms"),
expire-tokens (every m3ter token expires just before this request is checked).
"""

from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import http.server
import json
import secrets
import socket
import threading
import time
import typing as t
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from target_usage_billing.sandbox.contracts import (
    M3TER_MAX_BODY,
    ItemError,
    m3ter_items,
    metronome_items,
)

DESTINATIONS = ("m3ter", "metronome")
FAULT_KINDS = (
    "401",
    "403",
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

    def __init__(self, path: Path, id_field: str):
        self.path = path
        self.id_field = id_field
        self.index: dict[str, bytes] = {}
        self.count = 0
        self._id_decoder = msgspec.json.Decoder(dict[str, t.Any])
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "rb") as existing:
                for line in existing:
                    if line.strip():
                        self.count += 1
                        item_id = self._id_decoder.decode(line).get(id_field)
                        if item_id is not None:
                            self.index[item_id] = _digest(line.rstrip(b"\n"))
        self._file = open(path, "ab")  # noqa: SIM115 - held open while serving

    def add(self, items: list[tuple[str | None, bytes]], stats: DestinationStats) -> None:
        fresh = []
        for item_id, raw in items:
            if item_id is not None:
                digest = _digest(raw)
                known = self.index.get(item_id)
                if known is not None:
                    stats.duplicates += 1
                    if known != digest:
                        stats.conflicts += 1
                    continue
                self.index[item_id] = digest
            fresh.append(raw)
        if fresh:
            self._file.write(b"\n".join(fresh) + b"\n")
            self._file.flush()
            self.count += len(fresh)
            stats.accepted += len(fresh)

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
        }
        self._arrivals = {name: collections.deque() for name in DESTINATIONS}
        self.generation = 0  # bumped by reset: requests still in flight then are void
        self._rate_windows = [collections.deque() for _ in settings.m3ter_rate_limits]

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


class _Reply(Exception):
    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _json_reply(status: int, document: t.Any, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(
        status, json.dumps(document).encode(), {"Content-Type": "application/json", **(headers or {})}
    )


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs
    # Headers and body leave in separate writes: without TCP_NODELAY, Nagle's algorithm
    # and the client's delayed ACK add ~40 ms to every answer with a body.
    disable_nagle_algorithm = True
    server: SandboxServer

    def log_message(self, format: str, *args: t.Any) -> None:
        pass  # quiet: the stats endpoint says what happened

    # --- plumbing ---------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if reply.body:
            self.wfile.write(reply.body)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _dispatch(self, method: str) -> None:
        path = urllib.parse.urlsplit(self.path).path
        sandbox = self.server.sandbox
        try:
            if path.startswith("/_sandbox/"):
                self._control(method, path[len("/_sandbox/") :])
            elif method == "POST" and path == "/oauth/token":
                self._token()
            elif method == "POST" and path.startswith("/organizations/") and path.endswith("/measurements"):
                self._ingest("m3ter", path)
            elif method == "POST" and path == "/v1/ingest":
                self._ingest("metronome", path)
            elif method == "GET" and path == "/v1/customers":
                self._metronome_auth()
                raise _json_reply(200, {"data": [], "next_page": None})
            else:
                raise _json_reply(404, {"message": f"no route for {method} {path}"})
        except _Reply as reply:
            self._send(reply)
        except _Dropped:
            self._drop()
        except Exception as exc:  # a sandbox bug must still answer
            with sandbox.lock:
                for stats in sandbox.stats.values():
                    stats.last_error = repr(exc)
            self._send(_json_reply(500, {"message": f"sandbox error: {exc!r}"}))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # --- m3ter auth ---------------------------------------------------------------------

    def _token(self) -> None:
        sandbox = self.server.sandbox
        body = self._body()
        settings = sandbox.settings
        with sandbox.lock:
            sandbox.stats["m3ter"].token_requests += 1
        expected = base64.b64encode(
            f"{settings.m3ter_access_key_id}:{settings.m3ter_api_secret}".encode()
        ).decode()
        if self.headers.get("Authorization") != f"Basic {expected}":
            raise _json_reply(401, {"message": "invalid client credentials"})
        grant = _grant_type(body, self.headers.get("Content-Type", ""))
        if grant != "client_credentials":
            raise _json_reply(400, {"message": "grant_type must be client_credentials"})
        token = secrets.token_urlsafe(24)
        with sandbox.lock:
            sandbox.tokens[token] = time.monotonic() + settings.token_lifetime
        lifetime = settings.token_lifetime
        raise _json_reply(
            200,
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(lifetime) if lifetime >= 1 else lifetime,
            },
        )

    def _m3ter_auth(self) -> None:
        sandbox = self.server.sandbox
        header = self.headers.get("Authorization", "")
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        with sandbox.lock:
            expiry = sandbox.tokens.get(token)
        if expiry is None or time.monotonic() >= expiry:
            raise _json_reply(403, {"message": "Forbidden or Unauthorized: token invalid or expired"})

    def _metronome_auth(self) -> None:
        expected = f"Bearer {self.server.sandbox.settings.metronome_api_token}"
        if self.headers.get("Authorization") != expected:
            raise _json_reply(403, {"message": "Unauthorized: invalid API token"})

    # --- ingest ------------------------------------------------------------------------

    def _ingest(self, destination: str, path: str) -> None:
        sandbox = self.server.sandbox
        raw_body = self._body()
        with sandbox.lock:
            stats = sandbox.stats[destination]
            stats.requests += 1
            sandbox.note_arrival(destination)
            fault = sandbox.take_fault(destination)
            latency = sandbox.settings.latency_ms
            generation = sandbox.generation
        try:
            if latency:
                time.sleep(latency / 1000)
            if fault is not None:
                with sandbox.lock:
                    stats.faults_applied += 1
                if fault.kind == "slow":
                    time.sleep(fault.delay_ms / 1000)
                elif fault.kind == "expire-tokens":  # this request already meets an expired token
                    with sandbox.lock:
                        sandbox.tokens = dict.fromkeys(sandbox.tokens, 0.0)
                elif fault.kind == "drop":
                    raise _Dropped
                elif fault.kind in ("401", "403", "429", "500", "502", "503", "504"):
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                    headers.update(fault.headers)
                    raise _json_reply(int(fault.kind), {"message": f"injected {fault.kind}"}, headers)
            if destination == "m3ter":
                items = self._m3ter_items(raw_body, stats)
            else:
                items = self._metronome_items(raw_body, stats)
            self._refuse_marked(destination, items)
            with sandbox.lock:
                if generation != sandbox.generation:  # reset while this request waited
                    raise _json_reply(503, {"message": "the sandbox was reset during this request"})
                stats.items_received += len(items)
                stats.max_items_per_request = max(stats.max_items_per_request, len(items))
                sandbox.stores[destination].add(items, stats)
            if fault is not None and fault.kind == "stored-500":
                raise _json_reply(500, {"message": "injected: stored, then failed to answer"})
            if fault is not None and fault.kind == "stored-drop":
                raise _Dropped
            if destination == "m3ter":
                raise _json_reply(200, {"result": "accepted"})
            raise _Reply(200)
        except _Reply as reply:
            with sandbox.lock:
                stats.statuses[str(reply.status)] += 1
                if reply.status == 400:
                    stats.rejected_requests += 1
                    stats.last_error = reply.body.decode(errors="replace")[:500]
            raise
        except _Dropped:
            with sandbox.lock:
                stats.statuses["dropped"] += 1
            raise

    def _refuse_marked(self, destination: str, items: list[tuple[str | None, bytes]]) -> None:
        markers = [m.encode() for m in self.server.sandbox.settings.refuse_items_containing]
        if not markers:
            return
        noun = "measurements" if destination == "m3ter" else "events"
        for index, (_item_id, raw) in enumerate(items):
            for marker in markers:
                if marker in raw:
                    message = f"{noun}[{index}]: refused (contains {marker.decode()!r})"
                    raise _json_reply(400, {"message": message})

    def _m3ter_items(self, body: bytes, stats: DestinationStats) -> list[tuple[str | None, bytes]]:
        self._m3ter_auth()
        sandbox = self.server.sandbox
        with sandbox.lock:
            stats.max_body_bytes = max(stats.max_body_bytes, len(body))
            limited = bool(sandbox.settings.m3ter_rate_limits) and sandbox.m3ter_rate_exceeded()
        if len(body) >= M3TER_MAX_BODY:
            raise _json_reply(403, {"message": f"request body of {len(body)} bytes is too large"})
        if limited:
            raise _json_reply(429, {"message": "rate limit exceeded"}, {"Retry-After": "1"})
        try:
            return m3ter_items(body)
        except ItemError as exc:
            raise _json_reply(400, {"message": str(exc)}) from None

    def _metronome_items(self, body: bytes, stats: DestinationStats) -> list[tuple[str | None, bytes]]:
        self._metronome_auth()
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            with self.server.sandbox.lock:
                stats.gzip_requests += 1
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError):
                raise _json_reply(400, {"message": "body is not valid gzip"}) from None
        with self.server.sandbox.lock:
            stats.max_body_bytes = max(stats.max_body_bytes, len(body))
        try:
            return metronome_items(body)
        except ItemError as exc:
            raise _json_reply(400, {"message": str(exc)}) from None

    # --- control -----------------------------------------------------------------------

    def _control(self, method: str, action: str) -> None:
        sandbox = self.server.sandbox
        if method == "GET" and action == "health":
            raise _json_reply(200, {"ok": True})
        if method == "GET" and action == "stats":
            with sandbox.lock:
                raise _json_reply(200, sandbox.stats_document())
        if method == "GET" and action.startswith("items/"):
            name = action[len("items/") :]
            if name not in sandbox.stores:
                raise _json_reply(404, {"message": f"no destination {name!r}"})
            with sandbox.lock:
                data = sandbox.stores[name].dump()
            raise _Reply(200, data, {"Content-Type": "application/x-ndjson"})
        if method == "POST" and action == "faults":
            try:
                document = json.loads(self._body() or b"{}")
                faults = [Fault.parse(spec) for spec in document.get("faults", [])]
            except (ValueError, TypeError, AttributeError) as exc:
                raise _json_reply(400, {"message": f"bad fault document: {exc}"}) from None
            with sandbox.lock:
                sandbox.faults.extend(faults)
                if "latency_ms" in document:
                    sandbox.settings.latency_ms = float(document["latency_ms"])
                if "token_lifetime" in document:
                    sandbox.settings.token_lifetime = float(document["token_lifetime"])
                if "refuse_items_containing" in document:
                    sandbox.settings.refuse_items_containing = list(document["refuse_items_containing"])
            raise _json_reply(200, {"faults_pending": len(sandbox.faults)})
        if method == "DELETE" and action == "faults":
            self._body()
            with sandbox.lock:
                sandbox.faults.clear()
                sandbox.settings.latency_ms = 0.0
                sandbox.settings.refuse_items_containing = []
            raise _json_reply(200, {"faults_pending": 0})
        if method == "GET" and action == "tokens":  # for tests that grep output for tokens
            with sandbox.lock:
                raise _json_reply(200, {"tokens": list(sandbox.tokens)})
        if method == "POST" and action == "expire-tokens":
            self._body()
            with sandbox.lock:
                expired = len(sandbox.tokens)
                sandbox.tokens = dict.fromkeys(sandbox.tokens, 0.0)
            raise _json_reply(200, {"expired": expired})
        if method == "POST" and action == "reset":
            self._body()
            with sandbox.lock:
                sandbox.reset()
            raise _json_reply(200, {"ok": True})
        raise _json_reply(404, {"message": f"no control action {method} {action}"})


class _Dropped(Exception):
    """Close the connection without an answer."""


def _grant_type(body: bytes, content_type: str) -> str | None:
    if "json" in content_type:
        try:
            return json.loads(body or b"{}").get("grant_type")
        except (ValueError, AttributeError):
            return None
    return urllib.parse.parse_qs(body.decode(errors="replace")).get("grant_type", [None])[0]


class SandboxServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    scheme = "http"

    def __init__(self, address: tuple[str, int], sandbox: Sandbox):
        super().__init__(address, Handler)
        self.sandbox = sandbox

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{self.scheme}://{host}:{port}"
