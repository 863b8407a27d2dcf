"""The platforms' read side: where a client reads back what the sandbox kept.

Each platform module has ``read_route(method, path, headers, sandbox)``: the reader of
that request (it authenticates as the platform does, then answers from the store), or
None when the request is not one of its reads. Faults apply to ingest requests only.
"""

from __future__ import annotations

import typing as t

from target_usage_billing.sandbox import lago, m3ter, metronome, openmeter, orb, stripe
from target_usage_billing.sandbox.readside import Reader
from target_usage_billing.sandbox.replies import Reply

_AT_ROOT = {"m3ter": m3ter, "metronome": metronome}
_PREFIXED = {module.NAME: module for module in (orb, lago, openmeter, stripe)}


def route(method: str, path: str, headers: t.Any, sandbox: t.Any) -> Reader | None:
    for name, module in _PREFIXED.items():
        if path.startswith(module.PREFIX + "/"):
            return _counted(
                name, module.read_route(method, path[len(module.PREFIX) :], headers, sandbox), sandbox
            )
    for name, module in _AT_ROOT.items():
        reader = module.read_route(method, path, headers, sandbox)
        if reader is not None:
            return _counted(name, reader, sandbox)
    return None


def _counted(name: str, reader: Reader | None, sandbox: t.Any) -> Reader | None:
    if reader is None:
        return None

    def counted(query: t.Mapping[str, list[str]], body: bytes) -> Reply:
        with sandbox.lock:
            sandbox.stats[name].read_requests += 1
        return reader(query, body)

    return counted
