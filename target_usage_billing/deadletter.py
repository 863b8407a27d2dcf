"""Rejected records, with the reason, kept in a JSONL file so that no usage vanishes."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import typing as t
from pathlib import Path

import msgspec

logger = logging.getLogger("target-usage-billing.deadletter")

_encoder = msgspec.json.Encoder(decimal_format="number")
# Where rejected records go when dead_letter_path is not set: the working directory
# (under Meltano, the project's root), so that no rejected usage is ever only logged.
DEFAULT_PATH = "target-usage-billing-dead-letters.jsonl"
# How many rejections are logged one by one before only the summary counts them.
LOGGED_REJECTIONS = 20


class DeadLetters:
    """Append-only JSONL of rejected records; thread-safe; flushed per line.

    One line per record: stream, input line, stage (schema | mapping | validation |
    conflict | api), reason, field and expression when known, the original record, the
    mapped payload when there is one, and the time. ``sync()`` makes the file durable
    before a STATE that covers those records is emitted.

    The file is opened (created if need be) when the run starts, so an unwritable path
    stops the run before any input is read; a file this run created and left empty is
    removed at the end.
    """

    def __init__(self, path: str | os.PathLike, secrets: t.Sequence[str] = ()):
        self.path = Path(path)
        self._secrets = [s.encode() for s in secrets if s]
        self._lock = threading.Lock()
        self._dirty = False
        self.count = 0
        existed = self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: t.BinaryIO | None = open(self.path, "ab")  # noqa: SIM115 - held open for the run
        self._created = not existed

    def write(
        self,
        *,
        stream: str,
        record: t.Any,
        stage: str,
        reason: str,
        line: int | None = None,
        field: str | None = None,
        expression: str | None = None,
        payload: t.Any = None,
        keys: dict[str, t.Any] | None = None,
        **details: t.Any,
    ) -> None:
        """One rejected record; ``keys`` are its key property values, ``details`` adds
        stage-specific keys (e.g. batch_file)."""
        entry = {
            "stream": stream,
            "line": line,
            "keys": keys,
            "stage": stage,
            "reason": reason,
            "field": field,
            "expression": expression,
            "record": record,
            "payload": payload,
            **details,
            "rejected_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        data = _encoder.encode(entry)
        for secret in self._secrets:
            data = data.replace(secret, b"***")
        with self._lock:
            self.count += 1
            if self.count <= LOGGED_REJECTIONS:
                where = f"line {line}, " if line else ""
                if keys:
                    where += ", ".join(f"{k}={v!r}"[:80] for k, v in keys.items()) + ", "
                logger.warning("Rejected a record of stream '%s' (%s%s): %s", stream, where, stage, reason)
            elif self.count == LOGGED_REJECTIONS + 1:
                logger.warning("More rejections: see the summary and %s", self.path)
            if self._file is not None:
                self._file.write(data + b"\n")
                self._file.flush()
                self._dirty = True

    def sync(self) -> None:
        """Make every written line durable (called before a STATE is emitted)."""
        with self._lock:
            if self._file is not None and self._dirty:
                os.fsync(self._file.fileno())
                self._dirty = False

    def close(self) -> None:
        self.sync()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                if self._created and not self.count:
                    self.path.unlink(missing_ok=True)
