"""Singer message reader: msgspec decoding with exact decimals, and line numbers.

Numbers with a fraction or exponent become ``Decimal`` (as in the SDK's own reader), so
the value the tap sent reaches the billing API unchanged. Every error names the line.
"""

from __future__ import annotations

import decimal
import logging
import sys
import typing as t
from collections import Counter

import msgspec
from singer_sdk.singerlib.encoding.base import GenericSingerReader

from target_usage_billing.errors import InputError

logger = logging.getLogger("target-usage-billing.reader")

_decoder = msgspec.json.Decoder(float_hook=decimal.Decimal)


class StopRequested(Exception):
    """A termination signal asked the target to stop reading."""


class LineReader(GenericSingerReader[str]):
    """Reads Singer messages, counting lines; the target asks it where it is."""

    def __init__(self) -> None:
        super().__init__()
        self.line_number = 0
        self.waiting_for_input = False  # True only while blocked on the next line
        self.stop_requested = False
        self.current_stream: str | None = None
        self.current_line: bytes | str = b""  # the raw line being processed

    @property
    def default_input(self) -> t.IO[t.Any]:
        return sys.stdin.buffer

    def _lines(self, source: t.Any) -> t.Iterator[t.Any]:
        """Lines of the input; binary streams are read in chunks of what is available.

        read1() returns whatever the pipe holds (at least one byte) instead of waiting
        for a full chunk, so a slow tap is never waited on, and splitting a chunk in C
        is several times cheaper than reading line by line.
        """
        read1 = getattr(source, "read1", None)
        if read1 is None:  # text streams (e.g. io.StringIO in tests)
            lines = iter(source)
            while True:
                if self.stop_requested:
                    raise StopRequested
                self.waiting_for_input = True
                try:
                    line = next(lines, None)
                finally:
                    self.waiting_for_input = False
                if line is None:
                    return
                yield line
        pending = b""
        while True:
            if self.stop_requested:  # e.g. a signal during start-up: do not wait for input
                raise StopRequested
            self.waiting_for_input = True
            try:
                chunk = read1(1 << 20)
            finally:
                self.waiting_for_input = False
            if not chunk:
                break
            lines = chunk.split(b"\n")
            lines[0] = pending + lines[0]
            pending = lines.pop()
            yield from lines
        if pending:
            yield pending

    def deserialize_json(self, line: str | bytes) -> dict:
        try:
            message = _decoder.decode(line)
        except msgspec.DecodeError as exc:
            msg = f"line {self.line_number}: not valid JSON ({exc})"
            raise InputError(msg) from None
        if not isinstance(message, dict):
            msg = f"line {self.line_number}: a Singer message must be a JSON object"
            raise InputError(msg)
        return message

    def process_lines(
        self,
        file_input: t.IO[t.Any] | None,
        callbacks: dict[str, t.Callable[[dict], None]],
    ) -> Counter[str]:
        stats: Counter[str] = Counter()
        source = file_input or self.default_input
        # bytes go to the JSON decoder as they are: no UTF-8 decoding of every line
        source = getattr(source, "buffer", source)
        for line in self._lines(source):
            self.line_number += 1
            self.current_line = line
            if not line or (line[:1].isspace() and not line.strip()):
                continue  # a blank line carries nothing; taps sometimes end with one
            message = self.deserialize_json(line)
            kind = message.get("type")
            self.current_stream = message.get("stream")
            callback = callbacks.get(kind) if isinstance(kind, str) else None
            if callback is None:
                # Unknown message types cannot carry usage: skip them, loudly.
                logger.warning("line %d: skipping message of unknown type %r", self.line_number, kind)
            else:
                callback(message)
                stats[kind] += 1
            if self.stop_requested:
                raise StopRequested
        return stats
