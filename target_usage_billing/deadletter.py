"""Rejected records, with the reason, kept in a JSONL file so that no usage vanishes."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import typing as t
import uuid
from pathlib import Path

import msgspec

from target_usage_billing import outputs
from target_usage_billing.errors import OutputError
from target_usage_billing.mapping.ids import derive_id

logger = logging.getLogger("target-usage-billing.deadletter")

_encoder = msgspec.json.Encoder(decimal_format="number")
# Where rejected records go when dead_letter_path is not set: the working directory
# (under Meltano, the project's root), so that no rejected usage is ever only logged.
DEFAULT_PATH = "target-usage-billing-dead-letters.jsonl"
# How many rejections are logged one by one before only the summary counts them.
LOGGED_REJECTIONS = 20


class DeadLetters:
    """Append-only JSONL of rejected records, shared safely by concurrent runs.

    One line per record: the run, stream, input line, the record's derived id, stage
    (schema | mapping | validation | conflict | api), reason, field and expression when
    known, the original record, the mapped payload when there is one, and the time.
    ``sync()`` makes the file durable before a STATE that covers those records is emitted.

    Several runs (pipelines of one Meltano project) may share the file: each line is one
    locked append (see outputs.py), and no run ever removes or truncates what is there.
    The file is created by the first rejection; that it can be is checked when the run
    starts, so an unwritable path stops the run before any input is read. A line that
    cannot be written whole stops the run (OutputError, exit 9) before any STATE covers
    the record.
    """

    setting = "dead_letter_path"

    def __init__(self, path: str | os.PathLike, secrets: t.Sequence[str] = (), run_id: str = ""):
        self.path = Path(path)
        self.run_id = run_id or uuid.uuid4().hex
        self._secrets = [s.encode() for s in secrets if s]
        self._lock = threading.Lock()
        self._dirty = False
        self.count = 0
        self.failure: OutputError | None = None
        outputs.check_writable(self.path)
        self._fd: int | None = None

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
            "run_id": self.run_id,
            "stream": stream,
            "line": line,
            "keys": keys,
            # the same record rejected by a later run has the same record_id
            "record_id": derive_id(stream, record, list(keys or ())) if type(record) is dict else None,
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
            if self.failure is not None:
                raise self.failure
            if self._fd is None:
                try:
                    self._fd = outputs.open_append(self.path)
                except OSError as exc:
                    self.failure = outputs.output_error(self.setting, self.path, exc)
                    raise self.failure from None
            try:
                outputs.append_line(self._fd, data + b"\n", self.setting, self.path)
            except OutputError as exc:
                where = f", line {line}" if line else ""
                self.failure = OutputError(
                    f"{exc}; the rejected record of stream {stream!r}{where} was not recorded, "
                    "and no STATE covers it"
                )
                raise self.failure from None
            self._dirty = True
            self.count += 1
            if self.count <= LOGGED_REJECTIONS:
                where = f"line {line}, " if line else ""
                if keys:
                    where += ", ".join(f"{k}={v!r}"[:80] for k, v in keys.items()) + ", "
                logger.warning("Rejected a record of stream '%s' (%s%s): %s", stream, where, stage, reason)
            elif self.count == LOGGED_REJECTIONS + 1:
                logger.warning("More rejections: see the summary and %s", self.path)

    def sync(self) -> None:
        """Make every written line durable (called before a STATE is emitted)."""
        with self._lock:
            if self.failure is not None:
                raise self.failure
            if self._fd is not None and self._dirty:
                outputs.sync(self._fd, self.setting, self.path)
                self._dirty = False

    def close(self) -> None:
        """Close the file; it is never removed (another run may have written to it)."""
        with self._lock:
            if self._fd is not None:
                if self._dirty and self.failure is None:
                    try:
                        outputs.sync(self._fd, self.setting, self.path)
                    except OutputError as exc:
                        self.failure = exc
                os.close(self._fd)
                self._fd = None
        if self.failure is not None:
            raise self.failure
