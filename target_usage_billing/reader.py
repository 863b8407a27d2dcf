"""Singer message reader: msgspec decoding with exact decimals, and line numbers.

Numbers with a fraction or exponent become ``Decimal`` (as in the SDK's own reader), so
the value the tap sent reaches the billing API unchanged. Every error names the line.
"""

from __future__ import annotations

import codecs
import contextlib
import decimal
import gzip
import json
import logging
import select
import sys
import typing as t
from collections import Counter

import msgspec
from singer_sdk.singerlib.encoding.base import GenericSingerReader

from target_usage_billing.errors import InputError

logger = logging.getLogger("target-usage-billing.reader")

_decoder = msgspec.json.Decoder(float_hook=decimal.Decimal)
# Longest input line accepted: bounds memory against a runaway or hostile tap.
MAX_LINE_BYTES = 64 * 2**20


class StopRequested(Exception):
    """A termination signal asked the target to stop reading."""


# Yielded by LineReader._lines when input stayed quiet until buffered usage was due.
IDLE = object()


class LineReader(GenericSingerReader[str]):
    """Reads Singer messages, counting lines; the target asks it where it is."""

    def __init__(self) -> None:
        super().__init__()
        self.line_number = 0
        self.waiting_for_input = False  # True only while blocked on the next line
        self.stop_requested = False
        self.current_stream: str | None = None
        self.current_line: bytes | str = b""  # the raw line being processed
        # while a BATCH message's files are read: {"batch_file": URL, "batch_row": N}
        self.batch_location: dict[str, t.Any] = {}
        # while --replay feeds a dead letter: the mapping that rejected it (the only one
        # of its stream's mappings that bills it again)
        self.replay_mapping: str | None = None
        # Set by the target: how long input may stay quiet before on_idle must run
        # (None: nothing is waiting), and what to do then (send buffered usage).
        self.idle_timeout: t.Callable[[], float | None] = lambda: None
        self.on_idle: t.Callable[[], None] = lambda: None
        self.on_unknown_message: t.Callable[[str], None] = lambda kind: None
        # Set by the target: its handler for each message type it handles itself. The
        # SDK's own handlers (the callbacks process_lines is given) stay reachable in
        # sdk_handlers, for the messages a route hands back (e.g. records with stream maps).
        self.routes: dict[str, t.Callable[[dict], None]] = {}
        self.sdk_handlers: dict[str, t.Callable[[dict], None]] = {}

    @property
    def default_input(self) -> t.IO[t.Any]:
        return sys.stdin.buffer

    def _line_batches(self, source: t.Any) -> t.Iterator[t.Any]:
        """Lists of input lines (or IDLE); binary streams are read in chunks of what is
        available.

        read1() returns whatever the pipe holds (at least one byte) instead of waiting
        for a full chunk, so a slow tap is never waited on, and splitting a chunk in C
        is several times cheaper than reading line by line. A chunk's lines come as one
        list: the reading loop walks it without resuming a generator for every line.
        """
        read1 = getattr(source, "read1", None)
        try:
            fd: int | None = source.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
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
                yield [line]
        # The start of a line the chunk did not finish. A bytearray grows in place (large
        # ones by mremap, without copying) and the JSON decoder reads it as it is, so a
        # 50 MB line costs its own size once, in linear time.
        pending = bytearray()
        while True:
            if self.stop_requested:  # e.g. a signal during start-up: do not wait for input
                raise StopRequested
            timeout = self.idle_timeout() if fd is not None else None
            if timeout is not None and timeout <= 0:  # buffered usage is due: send it first
                yield IDLE
                timeout = self.idle_timeout()
            self.waiting_for_input = True
            try:
                # read1 with a size over the buffer's always empties it, so the file
                # descriptor tells whether more input is there.
                if timeout is not None and fd is not None and not select.select([fd], [], [], timeout)[0]:
                    chunk = None
                else:
                    chunk = read1(1 << 20)
            finally:
                self.waiting_for_input = False
            if chunk is None:  # a quiet tap: usage received so far must not wait for it
                yield IDLE
                continue
            if not chunk:
                break
            lines = chunk.split(b"\n")
            if len(lines) == 1:
                pending += chunk
                if len(pending) > MAX_LINE_BYTES:
                    self.line_number += 1
                    msg = (
                        f"line {self.line_number}: longer than {MAX_LINE_BYTES // 2**20} MiB; no Singer "
                        "message of usage is that large (is the input a Singer stream?)"
                    )
                    raise InputError(msg)
                continue
            if pending:
                pending += lines[0]
                lines[0] = pending  # handed over whole: a new buffer starts below
            tail = lines.pop()
            pending = bytearray(tail)
            yield lines
        if pending:
            yield [pending]

    def deserialize_json(self, line: str | bytes) -> dict:
        try:
            message = _decoder.decode(line)
        except msgspec.DecodeError as exc:
            message = self._decode_leniently(line, exc)
        except UnicodeDecodeError as exc:
            msg = f"line {self.line_number}: not valid UTF-8 (byte {exc.start}: {exc.reason})"
            raise InputError(msg) from None
        except RecursionError:
            msg = f"line {self.line_number}: JSON nested too deeply to be a usage record"
            raise InputError(msg) from None
        if not isinstance(message, dict):
            msg = f"line {self.line_number}: a Singer message must be a JSON object"
            raise InputError(msg)
        return message

    def _decode_leniently(self, line: str | bytes, error: msgspec.DecodeError) -> t.Any:
        """What strict JSON refuses but taps write: a BOM on line 1, NaN and Infinity.

        Python taps write ``NaN``/``Infinity`` for float values by default; such a line
        is read here (rare path) and the value reaches the mapping as a non-finite
        Decimal, which refuses it naming the field, so one record is dead-lettered
        instead of the run stopping.
        """
        raw = line.encode() if isinstance(line, str) else line
        if self.line_number == 1 and raw.startswith(codecs.BOM_UTF8):
            return self.deserialize_json(raw[len(codecs.BOM_UTF8) :])
        if b"NaN" in raw or b"Infinity" in raw:
            try:
                return json.loads(raw, parse_float=decimal.Decimal, parse_constant=decimal.Decimal)
            except (ValueError, RecursionError):
                pass
        msg = f"line {self.line_number}: not valid JSON ({error})"
        raise InputError(msg) from None

    def process_lines(
        self,
        file_input: t.IO[t.Any] | None,
        callbacks: dict[str, t.Callable[[dict], None]],
    ) -> Counter[str]:
        stats: Counter[str] = Counter()
        self.sdk_handlers = dict(callbacks)
        callbacks = {**callbacks, **self.routes}
        source = file_input or self.default_input
        # bytes go to the JSON decoder as they are: no UTF-8 decoding of every line
        source = getattr(source, "buffer", source)
        decode = _decoder.decode
        on_record = callbacks.get("RECORD")
        records = 0  # RECORD messages, counted here and added to stats at the end
        for lines in self._line_batches(source):
            if lines is IDLE:
                self.on_idle()
                continue
            for line in lines:
                self.line_number += 1
                self.current_line = line
                try:  # the common case inline; deserialize_json is the careful path
                    message = decode(line)
                except Exception:
                    if not line.strip():
                        continue  # a blank line carries nothing; taps sometimes end with one
                    message = self.deserialize_json(line)  # raises InputError, or reads NaN/BOM
                if type(message) is not dict:
                    message = self.deserialize_json(line)  # raises: not an object
                kind = message.get("type")
                self.current_stream = message.get("stream")
                if kind == "RECORD" and on_record is not None:  # nearly every line: no lookup
                    on_record(message)
                    records += 1
                else:
                    callback = callbacks.get(kind) if isinstance(kind, str) else None
                    if callback is None:
                        # Unknown message types cannot carry usage: skip them, loudly.
                        logger.warning("line %d: skipping message of unknown type %r", self.line_number, kind)
                        self.on_unknown_message(str(kind)[:40])
                    else:
                        callback(message)
                        stats[kind] += 1  # type: ignore[index]  # a str: callbacks are keyed by str
                if self.stop_requested:
                    raise StopRequested
        if records:
            stats["RECORD"] += records
        return stats


BATCH_COMPRESSIONS = (None, "none", "gzip")


def read_batch_files(reader: LineReader, message: dict) -> t.Iterator[dict]:
    """The records of a singer-sdk BATCH message, streamed row by row from its files.

    Supports the ``jsonl`` format, gzip-compressed or not, at any URL fsspec opens (local
    paths, ``file://``; ``s3://`` and others with their fsspec package installed). A gzip
    file is recognised by its content whatever the message says: singer-sdk 0.54 taps
    write gzip even when their batch_config asks for no compression. While
    a row is processed, ``reader.current_line`` holds it (for dead letters of API
    refusals) and ``reader.batch_location`` names the file and row. Anything else stops
    the run with InputError before a later STATE can cover the batch.
    """
    import fsspec  # singer-sdk's own dependency; imported only when a BATCH arrives

    where = f"line {reader.line_number} (stream {message.get('stream')!r})"
    encoding = message.get("encoding")
    manifest = message.get("manifest")
    if not isinstance(encoding, dict):
        raise InputError(f"{where}: a BATCH message needs an encoding object")
    form, compression = encoding.get("format"), encoding.get("compression")
    if form != "jsonl" or compression not in BATCH_COMPRESSIONS:
        msg = (
            f"{where}: BATCH encoding format={form!r} compression={compression!r} is not supported "
            "(format jsonl, compression gzip or none)"
        )
        raise InputError(msg)
    if not isinstance(manifest, list) or not all(isinstance(url, str) and url for url in manifest):
        raise InputError(f"{where}: a BATCH message's manifest must be a list of file URLs")
    url_json = msgspec.json.encode
    for url in manifest:
        try:
            with fsspec.open(url, "rb") as stored, _maybe_gunzip(stored) as handle:
                row = 0
                for raw in handle:
                    row += 1
                    raw = raw.rstrip(b"\r\n")
                    if not raw or raw.isspace():
                        continue
                    try:
                        record = _decoder.decode(raw)
                    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                        raise InputError(
                            f"{where}: BATCH file {url}, row {row}: not valid JSON ({exc})"
                        ) from None
                    if not isinstance(record, dict):
                        raise InputError(
                            f"{where}: BATCH file {url}, row {row}: a record must be a JSON object"
                        )
                    reader.batch_location = {"batch_file": url, "batch_row": row}
                    reader.current_line = (
                        b'{"record":' + raw + b',"batch_file":' + url_json(url) + b',"batch_row":%d}' % row
                    )
                    yield record
        except (OSError, EOFError, ValueError, ImportError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise InputError(f"{where}: BATCH file {url}: cannot read it ({reason})") from None


def _maybe_gunzip(stored: t.BinaryIO) -> t.ContextManager[t.Any]:
    head = stored.read(2)
    stored.seek(0)
    if head == b"\x1f\x8b":  # gzip's magic number: no JSON text starts with it
        return gzip.GzipFile(fileobj=stored, mode="rb")
    return contextlib.nullcontext(stored)
