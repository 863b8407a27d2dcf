"""usage-billing-sandbox: a loopback emulator of the billing platforms' ingest and read APIs.

Orb, Lago, OpenMeter and Stripe (and each platform added after them) are served under
a path prefix of their own (/orb, /lago, /openmeter, /stripe) by a module that knows the contract
(sandbox/orb.py, ...); m3ter and Metronome are served at the root, as the demo and the
examples have always addressed them.

It checks credentials, enforces the contracts (limits, per-item validation, time
windows, rate limits), de-duplicates by id, stores what it accepted under a data
directory, and reports what it saw. Faults can be injected from the command line or
the control endpoint, to rehearse outages before they happen in production.

Control endpoints (all under /_sandbox):
  GET  /health                   {"ok": true}
  GET  /stats                    counters per destination
  GET  /items/{DESTINATION}       accepted items, one JSON object per line
  POST /faults                   {"faults": [FAULT, ...], "latency_ms": N, "token_lifetime": S,
                                  "refuse_items_containing": [TEXT, ...]}
  DELETE /faults                 clear faults and latency
  GET  /tokens                   the m3ter tokens issued so far
  POST /expire-tokens            every issued m3ter token and Stripe session expires now
  POST /reset                    forget everything (items, stats, faults, tokens)
A FAULT is {"kind": K, "count": N, "every": N, "retry_after": S, "destination": D,
"headers": {NAME: VALUE}, "path": P, "after": N, "seconds": S} (after: let N matching
requests through first; seconds: a storm, every matching request for S seconds from
the first it meets) (P: the fault meets not the ingest requests but a
platform's other requests whose path holds P, e.g. "/close" of Orb's backfills) with
K one of 401, 403, 413, 429, 500, 502, 503, 504, drop, stored-500, stored-drop, slow (uses "delay_ms"),
expire-tokens (every m3ter token and Stripe session expires just before this request is
checked), html-200 (a captive portal's page), errors-200 (a gateway's 200 {"errors": ...}),
redirect (302 to a login page), trickle (the answer's body one byte every "delay_ms"),
and two that count items, not requests, and leave the answer as it is:
lost-after-ack (the item is acknowledged and never stored) and invalid-after-ack (stored,
then reported invalid through the platform's own channel and left out of its totals;
not for Orb and Lago, which validate in the request). They hit every N-th item ("every")
or the next N items ("count") among the items of each destination the store does not
hold yet (a re-sent id is not counted again), in body order, from the moment the fault is
set; an item both hit is lost. GET /stats lists, per destination, lost_ids and invalid_ids
(the platform's item ids, in the order hit, the first 100,000) and counts lost_after_ack,
invalid_after_ack.

Orb's backfill flow (sandbox/orb_backfills.py): POST /orb/v1/events/backfills,
POST /orb/v1/ingest?backfill_id=ID, POST /orb/v1/events/backfills/{id}/close and /revert,
GET /orb/v1/events/backfills[/{id}].

Read endpoints (sandbox/readback.py; authenticated as each platform's ingest; faults do
not apply to them; read_requests in the stats counts them):
  m3ter      GET  /organizations/{org}/meters, /accounts      ?codes=a,b&ids=..&pageSize&nextToken
             POST /organizations/{org}/usage/query             startDate, endDate, meterIds, ...
             GET  /organizations/{org}/events                  ?eventName=ingest.validation.failure
  Metronome  POST /v1/events/search                            {"transactionIds": [...]} (1-100)
  Orb        POST /orb/v1/events/search                        {"event_ids", "timeframe_start", ..}
             GET  /orb/v1/events/volume                        ?timeframe_start&timeframe_end&limit
  Lago       GET  /lago/api/v1/events/{transaction_id}
  OpenMeter  GET  /openmeter/api/v1/events                     ?from&to&id&subject&limit&ingestedAt..
  Stripe     GET  /stripe/v1/billing/meters[/{id}[/event_summaries]]  ?customer&start_time&end_time
             GET  /stripe/v2/core/events                       ?object_id (meter error reports)
"""

from __future__ import annotations

import base64
import gzip
import http.server
import json
import secrets
import socket
import time
import typing as t
import urllib.parse

from target_usage_billing.sandbox import control, lago, openmeter, orb, readback, stripe
from target_usage_billing.sandbox.contracts import (
    M3TER_MAX_BODY,
    ItemError,
    m3ter_items,
    metronome_items,
)
from target_usage_billing.sandbox.replies import Reply, json_reply
from target_usage_billing.sandbox.state import (
    DestinationStats,
    Sandbox,
)

# Platforms served under a path prefix of their own (/orb/v1/ingest ...): each module
# says how it authenticates, validates, refuses and answers.
PLATFORMS: dict[str, t.Any] = {module.NAME: module for module in (orb, lago, openmeter, stripe)}


# What a captive portal, a proxy or an API gateway answers in front of a platform.
MIDDLEBOX_ANSWERS: dict[str, t.Callable[[], Reply]] = {
    "html-200": lambda: Reply(
        200,
        b"<!DOCTYPE html><html><body>Sign in to the guest network to continue</body></html>",
        {"Content-Type": "text/html; charset=utf-8"},
    ),
    "errors-200": lambda: json_reply(200, {"errors": [{"message": "upstream connect error"}]}),
    "redirect": lambda: Reply(302, b"", {"Location": "https://portal.example.net/login"}),
}


def _platform_for(path: str) -> t.Any:
    for module in PLATFORMS.values():
        if path.startswith(module.PREFIX + "/"):
            return module
    return None


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

    _trickle_seconds = 0.0  # a "trickle" fault: the body's bytes this far apart

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        trickle, self._trickle_seconds = self._trickle_seconds, 0.0
        if reply.body and trickle:
            self.wfile.flush()
            try:
                for index in range(len(reply.body)):
                    time.sleep(trickle)
                    self.wfile.write(reply.body[index : index + 1])
                    self.wfile.flush()
            except OSError:  # the client gave up waiting, as it should
                self.close_connection = True
        elif reply.body:
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
                control.handle(method, path[len("/_sandbox/") :], self._body, sandbox)
            elif method == "POST" and path == "/oauth/token":
                self._token()
            elif method == "POST" and path.startswith("/organizations/") and path.endswith("/measurements"):
                self._ingest("m3ter", path)
            elif method == "POST" and path == "/v1/ingest":
                self._ingest("metronome", path)
            elif method == "GET" and path == "/v1/customers":
                self._metronome_auth()
                raise json_reply(200, {"data": [], "next_page": None})
            elif (read := readback.route(method, path, self.headers, sandbox)) is not None:
                raise read(urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query), self._body())
            elif (platform := _platform_for(path)) is not None:
                subpath = path[len(platform.PREFIX) :]
                if method == "POST" and subpath == platform.INGEST_PATH:
                    self._ingest(platform.NAME, subpath)
                if hasattr(platform, "sandbox_route"):  # e.g. Orb's backfills
                    self._other_request(platform, method, subpath)
                reply = platform.other_route(method, subpath, self.headers, sandbox.settings)
                raise reply or json_reply(404, {"message": f"no route for {method} {path}"})
            else:
                raise json_reply(404, {"message": f"no route for {method} {path}"})
        except Reply as reply:
            self._send(reply)
        except _Dropped:
            self._drop()
        except Exception as exc:  # a sandbox bug must still answer
            with sandbox.lock:
                for stats in sandbox.stats.values():
                    stats.last_error = repr(exc)
            self._send(json_reply(500, {"message": f"sandbox error: {exc!r}"}))

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
            raise json_reply(401, {"message": "invalid client credentials"})
        grant = _grant_type(body, self.headers.get("Content-Type", ""))
        if grant != "client_credentials":
            raise json_reply(400, {"message": "grant_type must be client_credentials"})
        token = secrets.token_urlsafe(24)
        with sandbox.lock:
            sandbox.tokens[token] = time.monotonic() + settings.token_lifetime
        lifetime = settings.token_lifetime
        raise json_reply(
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
            raise json_reply(403, {"message": "Forbidden or Unauthorized: token invalid or expired"})

    def _metronome_auth(self) -> None:
        expected = f"Bearer {self.server.sandbox.settings.metronome_api_token}"
        if self.headers.get("Authorization") != expected:
            raise json_reply(403, {"message": "Unauthorized: invalid API token"})

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
                self._apply_fault(fault, stats)
            platform = PLATFORMS.get(destination)
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            items = self._items(destination, platform, raw_body, query, stats)
            self._refuse_marked(destination, items)
            with sandbox.lock:
                if generation != sandbox.generation:  # reset while this request waited
                    raise json_reply(503, {"message": "the sandbox was reset during this request"})
                stats.items_received += len(items)
                stats.max_items_per_request = max(stats.max_items_per_request, len(items))
                if platform is not None and hasattr(platform, "already_stored"):
                    index = sandbox.stores[destination].index
                    stats.duplicates += sum(1 for key, _raw in items if key in index)  # re-sent ids
                    platform.already_stored(items, index)  # refuses the request if any
                if platform is not None and hasattr(platform, "divert"):  # e.g. into an Orb backfill
                    diverted = platform.divert(query, items, sandbox)
                    if diverted is not None:
                        raise diverted
                lost, invalid = sandbox.item_faults(destination, items)
                new_ids, known_ids = sandbox.stores[destination].add(items, stats, lost, invalid)
            if fault is not None and fault.kind == "stored-500":
                raise json_reply(500, {"message": "injected: stored, then failed to answer"})
            if fault is not None and fault.kind == "stored-drop":
                raise _Dropped
            if platform is not None:
                raise platform.accepted(new_ids, known_ids, query)
            if destination == "m3ter":
                raise json_reply(200, {"result": "accepted"})
            raise Reply(200)
        except Reply as reply:
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

    def _other_request(self, platform: t.Any, method: str, subpath: str) -> None:
        """A platform's other endpoints (Orb's backfills), with the faults naming their path:
        status kinds and drop answer instead; stored-500 and stored-drop after it is done."""
        sandbox = self.server.sandbox
        body = self._body()
        with sandbox.lock:
            fault = sandbox.take_fault(platform.NAME, path=subpath)
            if fault is not None:
                sandbox.stats[platform.NAME].faults_applied += 1
        kind = fault.kind if fault is not None else None
        if kind == "drop":
            raise _Dropped
        if kind is not None and kind.isdigit():
            headers = {"Retry-After": fault.retry_after} if fault and fault.retry_after else {}
            raise json_reply(int(kind), {"message": f"injected {kind}"}, headers)
        routed = platform.sandbox_route(method, subpath, self.headers, body, sandbox)
        if routed is None:
            return
        if kind == "stored-drop":
            raise _Dropped
        if kind == "stored-500":
            raise json_reply(500, {"message": "injected: done, then failed to answer"})
        raise routed

    def _apply_fault(self, fault: t.Any, stats: t.Any) -> None:
        """What an injected fault does before the request is read (some answer for it)."""
        sandbox = self.server.sandbox
        with sandbox.lock:
            stats.faults_applied += 1
        if fault.kind == "slow":
            time.sleep(fault.delay_ms / 1000)
        elif fault.kind == "expire-tokens":  # this request already meets an expired token
            with sandbox.lock:
                sandbox.tokens = dict.fromkeys(sandbox.tokens, 0.0)
            stripe.expire_sessions()
        elif fault.kind == "drop":
            raise _Dropped
        elif fault.kind in MIDDLEBOX_ANSWERS:
            raise MIDDLEBOX_ANSWERS[fault.kind]()
        elif fault.kind == "trickle":
            self._trickle_seconds = fault.delay_ms / 1000
        elif fault.kind in ("401", "403", "413", "429", "500", "502", "503", "504"):
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            headers.update(fault.headers)
            raise json_reply(int(fault.kind), {"message": f"injected {fault.kind}"}, headers)

    def _items(
        self, destination: str, platform: t.Any, raw_body: bytes, query: dict, stats: t.Any
    ) -> list[tuple[str | None, bytes]]:
        """The request's items (id, raw JSON), authenticated and checked by the contract."""
        sandbox = self.server.sandbox
        if platform is not None:
            platform.authenticate(self.headers, sandbox.settings)
            if hasattr(platform, "check_request"):
                platform.check_request(self.headers)
            with sandbox.lock:
                stats.max_body_bytes = max(stats.max_body_bytes, len(raw_body))
            return t.cast(list[tuple[str | None, bytes]], platform.items(raw_body, query, sandbox.settings))
        if destination == "m3ter":
            return self._m3ter_items(raw_body, stats)
        return self._metronome_items(raw_body, stats)

    def _refuse_marked(self, destination: str, items: list[tuple[str | None, bytes]]) -> None:
        markers = [m.encode() for m in self.server.sandbox.settings.refuse_items_containing]
        if not markers:
            return
        noun = "measurements" if destination == "m3ter" else "events"
        platform = PLATFORMS.get(destination)
        for index, (item_id, raw) in enumerate(items):
            for marker in markers:
                if marker in raw:
                    message = f"{noun}[{index}]: refused (contains {marker.decode()!r})"
                    if platform is not None:
                        raise platform.refusal(index, item_id, message)
                    raise json_reply(400, {"message": message})

    def _m3ter_items(self, body: bytes, stats: DestinationStats) -> list[tuple[str | None, bytes]]:
        self._m3ter_auth()
        sandbox = self.server.sandbox
        with sandbox.lock:
            stats.max_body_bytes = max(stats.max_body_bytes, len(body))
            limited = bool(sandbox.settings.m3ter_rate_limits) and sandbox.m3ter_rate_exceeded()
        if len(body) >= M3TER_MAX_BODY:
            raise json_reply(403, {"message": f"request body of {len(body)} bytes is too large"})
        if limited:
            raise json_reply(429, {"message": "rate limit exceeded"}, {"Retry-After": "1"})
        try:
            return m3ter_items(body)
        except ItemError as exc:
            raise json_reply(400, {"message": str(exc)}) from None

    def _metronome_items(self, body: bytes, stats: DestinationStats) -> list[tuple[str | None, bytes]]:
        self._metronome_auth()
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            with self.server.sandbox.lock:
                stats.gzip_requests += 1
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError):
                raise json_reply(400, {"message": "body is not valid gzip"}) from None
        with self.server.sandbox.lock:
            stats.max_body_bytes = max(stats.max_body_bytes, len(body))
        try:
            return metronome_items(body)
        except ItemError as exc:
            raise json_reply(400, {"message": str(exc)}) from None


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
        name = host.decode() if isinstance(host, bytes) else host
        return f"{self.scheme}://{name}:{port}"
