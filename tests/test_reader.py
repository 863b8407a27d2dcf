"""The Singer reader: chunked binary input split into exact lines, with line numbers."""

from __future__ import annotations

import io
import json

import pytest

from target_usage_billing.errors import InputError
from target_usage_billing.reader import LineReader


class Trickle(io.RawIOBase):
    """A pipe that hands over a few bytes per read, like a slow tap."""

    def __init__(self, data: bytes, step: int):
        self.data, self.step, self.position = data, step, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        piece = self.data[self.position : self.position + self.step]
        buffer[: len(piece)] = piece
        self.position += len(piece)
        return len(piece)


def read_all(data: bytes, step: int | None = None) -> list[tuple[int, dict]]:
    source = io.BufferedReader(Trickle(data, step)) if step else io.BytesIO(data)
    reader = LineReader()
    seen = []
    reader.process_lines(source, {"RECORD": lambda m: seen.append((reader.line_number, m["record"]))})
    return seen


def records(count: int, size: int = 10) -> bytes:
    lines = [
        json.dumps({"type": "RECORD", "stream": "s", "record": {"i": i, "pad": "x" * size}})
        for i in range(count)
    ]
    return "\r\n".join(lines).encode()  # CRLF endings, and no newline after the last line


@pytest.mark.parametrize("step", [None, 7, 4096])
def test_every_line_arrives_whole_with_its_number(step):
    data = records(300)
    assert [(n, r["i"]) for n, r in read_all(data, step)] == [(i + 1, i) for i in range(300)]


def test_lines_longer_than_a_chunk_and_spanning_chunks():
    data = records(5, size=700_000)  # 3.5 MB: lines cross the 1 MiB chunk boundaries
    assert [r["i"] for _, r in read_all(data)] == [0, 1, 2, 3, 4]


def test_a_broken_line_is_named_by_number():
    data = records(3) + b'\n{"type": "RECORD", "rec'
    with pytest.raises(InputError, match="line 4: not valid JSON"):
        read_all(data)
