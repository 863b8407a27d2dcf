"""--replay DEAD_LETTERS.jsonl: records rejected earlier, through today's mapping and delivery.

The dead-letter file is read as it was written: each record's JSON text is kept byte for
byte (msgspec.Raw) and handed to the target's own reader, which decodes numbers as exact
decimals, exactly as it decodes a tap's lines. Each stream gets a SCHEMA with the key
properties its dead letters name (``keys``), so derived ids are the ids the original
run gave those records and a replay (or a second one) is de-duplicated by the platform.

The file is read once to check every line and learn the streams, then once per stage
selected: between stages delivery catches up, so the summary can say per stage and
stream what was replayed, sent and rejected again. Records rejected again go to a new
dead-letter file beside the one replayed (never appended to it). A replay emits no
STATE: it moves no tap's bookmark.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import logging
import typing as t
import uuid
from pathlib import Path

import msgspec

from target_usage_billing.errors import ConfigError

if t.TYPE_CHECKING:
    from target_usage_billing.reader import LineReader
    from target_usage_billing.target import TargetUsageBilling

logger = logging.getLogger("target-usage-billing.replay")

# Every stage a dead letter can have (deadletter.py, reconcile.py).
STAGES = ("input", "schema", "mapping", "validation", "conflict", "api", "platform")
# What --replay takes without --stage: the stages a fixed mapping or a recovered
# platform can cure. schema (the letter keeps no JSON Schema to validate against again)
# and conflict (the platform keeps the first body with that id) only when asked.
DEFAULT_STAGES = ("mapping", "validation", "api")
SHOWN_BAD_LINES = 100  # bad lines named one by one; the rest are counted

_encode = msgspec.json.Encoder(decimal_format="number").encode


class DeadLetter(msgspec.Struct):
    """The parts of a dead-letter line a replay needs; ``record`` as its exact JSON text."""

    stream: str
    stage: str
    record: msgspec.Raw = msgspec.Raw(b"null")
    keys: t.Optional[dict[str, t.Any]] = None  # noqa: UP045 (msgspec reads the annotation)
    run_id: t.Optional[str] = None  # noqa: UP045
    line: t.Optional[int] = None  # noqa: UP045
    record_id: t.Optional[str] = None  # noqa: UP045
    mapping: t.Optional[str] = None  # noqa: UP045


_decoder = msgspec.json.Decoder(DeadLetter, float_hook=decimal.Decimal)


def parse_stages(text: str | None) -> tuple[str, ...]:
    if not text:
        return DEFAULT_STAGES
    stages = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(
            f"--stage: unknown stage {', '.join(unknown) or repr(text)} (stages: {', '.join(STAGES)})"
        )
    return stages


def new_dead_letter_path(replayed: Path) -> Path:
    """Beside the replayed file, named after it and the time: never the file replayed."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = replayed.name[: -len(".jsonl")] if replayed.name.endswith(".jsonl") else replayed.name
    return replayed.with_name(f"{stem}.replayed-{when}-{uuid.uuid4().hex[:6]}.jsonl")


@dataclasses.dataclass
class Share:
    """One stage and stream of a replay."""

    replayed: int = 0
    sent: int = 0
    failed_again: int = 0
    filtered: int = 0
    duplicates: int = 0
    already_stored: int = 0


class Replay:
    """The replay of one dead-letter file: what it holds, and what became of it."""

    def __init__(self, path: str, stages: tuple[str, ...]):
        self.path = Path(path)
        self.stages = stages
        self.letters_read = 0
        self.bad_lines = 0
        self.key_properties: dict[str, list[str]] = {}
        self.not_replayed: dict[str, dict[str, int]] = {}  # why -> stage -> count
        self.order: list[str] = []  # selected stages, in the order the file first has them
        self.shares: dict[str, dict[str, Share]] = {}  # stage -> stream -> figures
        self.new_path: Path | None = None
        if not self.path.is_file():
            raise ConfigError(f"--replay {path}: no such file")

    # --- reading ----------------------------------------------------------------------

    def _letters(self, *, check: bool) -> t.Iterator[tuple[int, DeadLetter]]:
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 (closed below; OSError named)
        except OSError as exc:
            raise ConfigError(f"--replay {self.path}: cannot read it ({exc.strerror})") from None
        with handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    letter = _decoder.decode(raw)
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                    if check:
                        self._bad_line(number, exc)
                    continue
                yield number, letter

    def _bad_line(self, number: int, exc: Exception) -> None:
        self.bad_lines += 1
        text = str(exc).replace("\n", " ")
        what = "not valid JSON" if "JSON" in text or "malformed" in text.lower() else "not a dead letter"
        if self.bad_lines <= SHOWN_BAD_LINES:
            logger.error("--replay %s, line %d: %s (%s); skipped", self.path, number, what, text[:200])
        elif self.bad_lines == SHOWN_BAD_LINES + 1:
            logger.error("--replay %s: more lines could not be read; the summary counts them", self.path)

    def scan(self) -> None:
        """First pass: every line checked, streams and their key properties learnt."""
        for number, letter in self._letters(check=True):
            self.letters_read += 1
            why = self._why_not(number, letter)
            if why is not None:
                counts = self.not_replayed.setdefault(why, {})
                counts[letter.stage] = counts.get(letter.stage, 0) + 1
                continue
            if letter.stage not in self.order:
                self.order.append(letter.stage)
            share = self.shares.setdefault(letter.stage, {}).setdefault(letter.stream, Share())
            share.replayed += 1
        self.order.sort(key=self.stages.index)

    def _why_not(self, number: int, letter: DeadLetter) -> str | None:
        if letter.stage not in self.stages:
            return "stage not selected (--stage)"
        if not bytes(letter.record).startswith(b"{"):
            return "holds no record (re-send it from the tap)"
        if not letter.stream:
            return "names no stream"
        keys = list(letter.keys or ())
        known = self.key_properties.setdefault(letter.stream, keys)
        if known != keys:
            logger.warning(
                "--replay %s, line %d: stream '%s' has key properties %s here and %s in its first "
                "dead letter; its derived id would change, so it is not replayed",
                self.path,
                number,
                letter.stream,
                keys,
                known,
            )
            return "other key properties than the stream's first dead letter"
        return None

    # --- feeding the target -------------------------------------------------------------

    def lines(self, target: TargetUsageBilling) -> t.Iterator[bytes]:
        """Singer lines for the target's reader, stage after stage; delivery catches up
        between stages so each stage's figures are its own."""
        reader = target.message_reader
        announced: set[str] = set()
        path_text = str(self.path.resolve())
        for stage in self.order:
            before = _snapshot(target)
            for number, letter in self._letters(check=False):
                if letter.stage != stage or self._skip(letter):
                    continue
                stream = letter.stream
                if stream not in announced:
                    announced.add(stream)
                    _at_line(reader, number)
                    yield _schema_line(stream, self.key_properties[stream])
                replay = {
                    "file": path_text,
                    "line": number,
                    "stage": stage,
                    "run_id": letter.run_id,
                    "record_id": letter.record_id,
                    "input_line": letter.line,
                }
                # sink rejections take it from here, API refusals from the line's text
                reader.batch_location = {"replay": replay}
                reader.replay_mapping = letter.mapping
                _at_line(reader, number)
                yield (
                    b'{"type":"RECORD","stream":'
                    + _encode(stream)
                    + b',"record":'
                    + bytes(letter.record)
                    + b',"replay":'
                    + _encode(replay)
                    + b"}"
                )
            reader.batch_location = {}
            reader.replay_mapping = None
            target.flush_and_wait()
            self._settle(stage, before, _snapshot(target))

    def _skip(self, letter: DeadLetter) -> bool:
        return (
            letter.stage not in self.stages
            or not bytes(letter.record).startswith(b"{")
            or not letter.stream
            or self.key_properties.get(letter.stream) != list(letter.keys or ())
        )

    def _settle(self, stage: str, before: dict, after: dict) -> None:
        for stream, share in self.shares.get(stage, {}).items():
            old, new = before.get(stream, {}), after.get(stream, {})

            def delta(name: str, old: dict = old, new: dict = new) -> int:
                return new.get(name, 0) - old.get(name, 0)

            share.sent = delta("sent")
            share.failed_again = delta("rejected")
            share.filtered = delta("filtered")
            share.duplicates = delta("duplicates")
            share.already_stored = delta("already_stored")

    # --- what it did --------------------------------------------------------------------

    @property
    def replayed(self) -> int:
        return sum(s.replayed for streams in self.shares.values() for s in streams.values())

    @property
    def failed_again(self) -> int:
        return sum(s.failed_again for streams in self.shares.values() for s in streams.values())

    def figures(self) -> dict[str, t.Any]:
        return {
            "file": str(self.path.resolve()),
            "stages": list(self.stages),
            "dead_letters_read": self.letters_read,
            "bad_lines": self.bad_lines,
            "replayed": self.replayed,
            "sent": sum(s.sent for streams in self.shares.values() for s in streams.values()),
            "failed_again": self.failed_again,
            "new_dead_letters": str(self.new_path.resolve()) if self.new_path else None,
            "by_stage": {
                stage: {stream: dataclasses.asdict(s) for stream, s in sorted(streams.items())}
                for stage, streams in self.shares.items()
            },
            "not_replayed": self.not_replayed,
        }

    def summary_lines(self) -> list[str]:
        lines = [
            f"Replay of {self.path}: {self.letters_read} dead letters read, {self.replayed} replayed "
            f"(stages {', '.join(self.stages)})"
        ]
        for stage in self.order:
            for stream, s in sorted(self.shares[stage].items()):
                more = f", filtered {s.filtered}" if s.filtered else ""
                more += f", duplicates {s.duplicates}" if s.duplicates else ""
                more += f", already stored {s.already_stored}" if s.already_stored else ""
                lines.append(
                    f"  stage {stage}, stream {stream}: replayed {s.replayed}, sent {s.sent}, "
                    f"failed again {s.failed_again}{more}"
                )
        for why, stages in self.not_replayed.items():
            counted = ", ".join(f"{n} of stage {stage}" for stage, n in sorted(stages.items()))
            lines.append(f"  not replayed: {counted}: {why}")
        if self.bad_lines:
            lines.append(f"  lines that could not be read: {self.bad_lines} (named above)")
        if self.failed_again:
            lines.append(f"  rejected again: {self.failed_again}, in {self.new_path}")
        lines.append("  the file replayed is left as it was; a replay writes no STATE")
        return lines


def _at_line(reader: LineReader, number: int) -> None:
    # the reader counts the line it is given: errors and new dead letters then name the
    # line of the file replayed
    reader.line_number = number - 1


def _schema_line(stream: str, keys: list[str]) -> bytes:
    return _encode(
        {
            "type": "SCHEMA",
            "stream": stream,
            "schema": {"type": "object", "properties": {}, "additionalProperties": True},
            "key_properties": keys,
        }
    )


def _snapshot(target: TargetUsageBilling) -> dict[str, dict[str, int]]:
    stats = target.billing_run.stats
    with stats.lock:
        return {
            name: {
                "sent": s.sent,
                "rejected": s.rejected,
                "filtered": s.filtered,
                "duplicates": s.duplicates,
                "already_stored": s.already_stored,
            }
            for name, s in stats.streams.items()
        }


def replay_settings(
    settings: dict[str, t.Any], env_prefix: str | None, replay: Replay, environ: t.MutableMapping[str, str]
) -> dict[str, t.Any]:
    """The run's settings for a replay: rejections go to a new file (the journal stays
    where the original runs kept it), no ratio limit (every record replayed was rejected
    once), no stream maps (dead letters hold records as the sink got them, maps applied)."""
    from target_usage_billing.deadletter import DEFAULT_PATH
    from target_usage_billing.journal_store import DEFAULT_JOURNAL_NAME

    def setting(name: str) -> t.Any:
        value = settings.get(name)
        if value in (None, "") and env_prefix:
            value = environ.get(env_prefix + name.upper())
        return value

    original = setting("dead_letter_path") or DEFAULT_PATH
    replay.new_path = new_dead_letter_path(replay.path.resolve())
    overrides: dict[str, t.Any] = {
        "dead_letter_path": str(replay.new_path),
        "max_rejected_ratio": 1,
        "flattening_enabled": False,
    }
    if not setting("journal_path") and not setting("journal_url"):
        overrides["journal_path"] = str(Path(original).parent / DEFAULT_JOURNAL_NAME)
    updated = {k: v for k, v in settings.items() if k != "stream_maps"}
    updated.update(overrides)
    if env_prefix:  # variables must not bring back what the replay sets
        environ.pop(env_prefix + "STREAM_MAPS", None)
        for name, value in overrides.items():
            environ[env_prefix + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return updated


def finish_replay(target: TargetUsageBilling, replay: Replay) -> None:
    """The replay's summary (one event with JSON logs); exit 5 for lines that could not be
    read, 6 for records rejected again, once everything else was delivered."""
    from target_usage_billing.cli import json_logs
    from target_usage_billing.errors import InputError, RejectionLimitError

    lines = replay.summary_lines()
    if json_logs.enabled:
        logger.info("\n".join(lines), extra={"event": "replay", "replay": replay.figures()})
    else:
        for line in lines:
            logger.info(line)
    if replay.bad_lines:
        msg = (
            f"--replay {replay.path}: {replay.bad_lines} line(s) could not be read (named above); "
            "every other dead letter selected was replayed"
        )
        raise InputError(msg)
    if replay.failed_again:
        msg = (
            f"{replay.failed_again} of {replay.replayed} replayed records were rejected again: "
            f"see {replay.new_path}"
        )
        raise RejectionLimitError(msg)
