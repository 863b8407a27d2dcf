"""The sandbox's control endpoints (under /_sandbox): health, stats, items, faults, tokens, reset."""

from __future__ import annotations

import json
import typing as t

from target_usage_billing.sandbox import stripe
from target_usage_billing.sandbox.replies import Reply, json_reply
from target_usage_billing.sandbox.state import Fault, Sandbox


def handle(method: str, action: str, read_body: t.Callable[[], bytes], sandbox: Sandbox) -> t.NoReturn:
    """Answer a control request (``/_sandbox/ACTION``): always raises the Reply."""
    if method == "GET" and action == "health":
        raise json_reply(200, {"ok": True})
    if method == "GET" and action == "stats":
        with sandbox.lock:
            raise json_reply(200, sandbox.stats_document())
    if method == "GET" and action.startswith("items/"):
        name = action[len("items/") :]
        if name not in sandbox.stores:
            raise json_reply(404, {"message": f"no destination {name!r}"})
        with sandbox.lock:
            data = sandbox.stores[name].dump()
        raise Reply(200, data, {"Content-Type": "application/x-ndjson"})
    if method == "POST" and action == "faults":
        try:
            document = json.loads(read_body() or b"{}")
            faults = [Fault.parse(spec) for spec in document.get("faults", [])]
        except (ValueError, TypeError, AttributeError) as exc:
            raise json_reply(400, {"message": f"bad fault document: {exc}"}) from None
        with sandbox.lock:
            sandbox.faults.extend(faults)
            if "latency_ms" in document:
                sandbox.settings.latency_ms = float(document["latency_ms"])
            if "token_lifetime" in document:
                sandbox.settings.token_lifetime = float(document["token_lifetime"])
            if "refuse_items_containing" in document:
                sandbox.settings.refuse_items_containing = list(document["refuse_items_containing"])
        raise json_reply(200, {"faults_pending": len(sandbox.faults)})
    if method == "DELETE" and action == "faults":
        read_body()
        with sandbox.lock:
            sandbox.faults.clear()
            sandbox.settings.latency_ms = 0.0
            sandbox.settings.refuse_items_containing = []
        raise json_reply(200, {"faults_pending": 0})
    if method == "GET" and action == "tokens":  # for tests that grep output for tokens
        with sandbox.lock:
            tokens = list(sandbox.tokens)
        raise json_reply(200, {"tokens": tokens + stripe.session_tokens()})
    if method == "POST" and action == "expire-tokens":
        read_body()
        with sandbox.lock:
            expired = len(sandbox.tokens)
            sandbox.tokens = dict.fromkeys(sandbox.tokens, 0.0)
        expired += stripe.expire_sessions()
        raise json_reply(200, {"expired": expired})
    if method == "POST" and action == "reset":
        read_body()
        with sandbox.lock:
            sandbox.reset()
        stripe.forget_sessions()
        raise json_reply(200, {"ok": True})
    raise json_reply(404, {"message": f"no control action {method} {action}"})
