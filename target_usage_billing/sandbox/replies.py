"""An HTTP answer the sandbox gives, raised from wherever the request is judged."""

from __future__ import annotations

import json
import typing as t


class Reply(Exception):
    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def json_reply(status: int, document: t.Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(
        status, json.dumps(document).encode(), {"Content-Type": "application/json", **(headers or {})}
    )
