"""One run of the target: the objects it wires together and the rules for stopping.

Owns the destination, the compiled rules, the delivery pipeline, the dead letters and
the statistics; decides when a STATE is checkpointed and when rejections are too many
(report.py says what it did). The Target class feeds it the messages it reads.
"""

from __future__ import annotations

import collections
import difflib
import logging
import os
import sys
import threading
import time
import typing as t

import msgspec

from target_usage_billing import horizon
from target_usage_billing.deadletter import DeadLetters
from target_usage_billing.delivery import Delivery, DryRunWriter
from target_usage_billing.destinations import DESTINATIONS, Destination
from target_usage_billing.errors import (
    ConfigError,
    JournalError,
    OutputError,
    RejectionLimitError,
    ResendBeyondWindowError,
    StreamMappingError,
    UnmatchedStreamError,
)
from target_usage_billing.http import HttpTransport
from target_usage_billing.idscheme import accepted, key_change_error
from target_usage_billing.journal import Journal
from target_usage_billing.journal_store import open_store
from target_usage_billing.ledger import IdLedger
from target_usage_billing.mapping import (
    CompiledRule,
    MappingRejection,
    StreamPlan,
    check_id_collisions,
    compile_rules,
    find_rules,
)
from target_usage_billing.ratelimit import RateLimiter
from target_usage_billing.settings import MIN_CHECKPOINT_SECONDS, Settings
from target_usage_billing.stats import RunStats

logger = logging.getLogger("target-usage-billing")
# The ratio limit is judged only once this many records reached a rule, so that two bad
# records among the first ten do not stop a run of millions.
MIN_RECORDS_FOR_RATIO = 1000
# STATE values go out exactly as the tap wrote them: Decimal keeps a fraction's digits,
# integers of any size stay integers.
state_encoder = msgspec.json.Encoder(decimal_format="number")


class BillingRun:
    """Everything one run of the target holds, wired at start-up from its settings."""

    def __init__(self, config: t.Mapping[str, t.Any], defaults: t.Mapping[str, t.Any]):
        self.settings = settings = Settings.from_config(config, defaults)
        destination_class = DESTINATIONS[settings.destination]
        problems = destination_class.config_errors(config, dry_run=settings.dry_run)
        if problems:
            raise ConfigError("; ".join(problems))
        specs = destination_class.field_specs(config)
        self.rules: list[CompiledRule] = compile_rules(
            config.get("mappings"), specs, destination_class.presets, destination_class.name
        )
        check_id_collisions(self.rules)
        for rule in self.rules if logger.isEnabledFor(logging.DEBUG) else ():
            _log_generated(rule.label, rule.apply)
        self.secrets = destination_class.secrets(config)
        self.transport = HttpTransport(
            timeout_seconds=settings.request_timeout_seconds,
            retry_budget_seconds=settings.max_retry_seconds,
        )
        self.destination: Destination = destination_class(config, self.transport)
        self.max_items_per_request = min(
            settings.batch_size_rows or destination_class.max_items_per_request,
            destination_class.max_items_per_request,
        )
        self.max_body_bytes = min(
            settings.batch_max_bytes or destination_class.max_body_bytes,
            destination_class.max_body_bytes,
        )
        if settings.max_requests_per_second is None:
            windows = destination_class.rate_limits
        elif settings.max_requests_per_second > 0:
            # n requests per n/rate seconds: exactly the rate asked, also below 1 per second
            rate = settings.max_requests_per_second
            burst = max(1, int(rate))
            windows = ((burst, burst / rate),)
        else:
            windows = ()  # 0: no client-side limit
        self.limiter = RateLimiter(windows)
        self.stats = RunStats()
        self.key_properties: dict[str, tuple[str, ...]] = {}  # per stream, set by its sink
        # dry run: the first payload of each (stream, mapping label)
        self.first_payloads: dict[tuple[str, str], t.Any] = {}
        self.dead_letters = _open_output(
            "dead_letter_path", DeadLetters, settings.dead_letter_path, self.secrets
        )
        self.dry_run = (
            _open_output("dry_run_path", DryRunWriter, settings.dry_run_path) if settings.dry_run else None
        )
        self.ledger = IdLedger(max_bytes=settings.id_ledger_megabytes * 2**20)
        keep_journal = settings.journal and not settings.dry_run
        # one run id for the journal and the dead letters
        run_id = self.dead_letters.run_id
        self.journal = open_journal(settings, self.destination, run_id) if keep_journal else None
        self.horizon = horizon.checker(self.journal, destination_class.dedup_window)
        if self.journal is None and not settings.dry_run and destination_class.dedup_window is not None:
            logger.warning(
                "The run journal is off: a re-send of usage %s acknowledged more than %s ago "
                "(a resume or replay) cannot be recognised, and %s would bill it again",
                destination_class.label,
                horizon.span(destination_class.dedup_window),
                destination_class.label,
            )
        self.delivery = Delivery(
            self.destination,
            self.transport,
            self.limiter,
            self.dead_letters,
            self.stats,
            max_in_flight=settings.max_requests_in_flight,
            adaptive_in_flight=settings.adaptive_requests_in_flight,
            on_states=self._emit_states,
            on_api_rejection=lambda: self.check_rejection_limits(final=False),
            key_properties=self.key_properties,
            dry_run=self.dry_run,
            journal=self.journal,
        )
        self.plan_by_stream: dict[str, StreamPlan | None] = {}
        # Partial batches of all streams share one budget: past it, the buffers that
        # started longest ago are handed over first (which also releases STATE soonest).
        self.buffer_budget = settings.buffer_megabytes * 2**20
        self.buffered_bytes = 0
        self.open_buffers: dict[int, t.Callable[[], None]] = {}  # sink buffers, oldest first
        self._rules_used: set[int] = set()
        self.records_seen = 0  # records read so far; a record's index is its position
        self.checkpoint_seconds = max(settings.state_checkpoint_seconds, MIN_CHECKPOINT_SECONDS)
        self._next_flush = time.monotonic() + self.checkpoint_seconds
        self._last_emitted: bytes | None = None
        self._stdout_lock = threading.Lock()
        self.states_emitted = 0
        self.states_withheld = 0  # dry run: STATEs that would have been emitted
        self.skipped_messages: collections.Counter[str] = collections.Counter()
        self.progress_thread: threading.Thread | None = None  # see report.start_progress
        self.finished = threading.Event()

    # --- rules -------------------------------------------------------------------------

    def plan_for(self, stream: str) -> StreamPlan | None:
        """The mappings that fire on ``stream``; a stream no rule matches stops the run
        unless allowed (None: skipped as unmatched).

        Called when the stream's SCHEMA arrives, before any of its records is read, so
        no STATE can ever cover records of a stream that was silently left out.
        """
        if stream in self.plan_by_stream:
            return self.plan_by_stream[stream]
        rules = find_rules(self.rules, stream)
        plan = StreamPlan(rules) if rules else None
        self.plan_by_stream[stream] = plan
        if plan is not None and plan.apply is not None and logger.isEnabledFor(logging.DEBUG):
            _log_generated(f"Stream '{stream}' (fan-out)", plan.apply)
        if plan is not None:
            self._rules_used.update(rule.index for rule in rules)
            if plan.skip:
                logger.info(
                    "Stream '%s': %s says skip: its records are counted, not sent", stream, rules[0].where
                )
            elif plan.fans_out:
                logger.info(
                    "Stream '%s': %d mappings bill each record their filters keep: %s",
                    stream,
                    len(rules),
                    ", ".join(rule.label for rule in rules),
                )
                for rule in rules[1:]:
                    if rule.name is None:
                        logger.warning(
                            "Stream '%s': %s has no name, so its derived ids include its index %d, "
                            'which changes when the rules are reordered; give it a "name"',
                            stream,
                            rule.where,
                            rule.index,
                        )
            return plan
        patterns = [r.stream_pattern for r in self.rules]
        closest = difflib.get_close_matches(stream, patterns, n=1, cutoff=0.5)
        hint = f"; closest: {closest[0]!r}" if closest else ""
        listed = ", ".join(repr(p) for p in patterns)
        if self.settings.unmatched_streams == "skip":
            logger.warning(
                "Stream '%s' matches no mapping rule (patterns: %s%s): its records are skipped "
                "(unmatched_streams is skip)",
                stream,
                listed,
                hint,
            )
            return None
        msg = (
            f"stream {stream!r} matches no mapping rule (patterns: {listed}{hint}), so its usage "
            "would not be billed; fix the rule's stream, add a rule "
            f'{{"stream": "{stream}", "skip": true}} if it carries no usage, or set '
            "unmatched_streams to skip"
        )
        raise UnmatchedStreamError(msg)

    def check_key_properties(self, stream: str, keys: t.Sequence[str]) -> None:
        """A SCHEMA giving ``stream`` other key properties than its earlier one: stop the
        run (exit 2) when that would change the ids derived for its records."""
        previous: t.Sequence[str] | None = self.key_properties.get(stream)
        where = ""
        if previous is None and self.journal is not None:  # what an earlier run derived ids from
            previous = self.journal.remembered_keys(stream)
            where = " (the run journal remembers the earlier key properties from a previous run)"
        plan = self.plan_for(stream)
        if plan is None or plan.skip:
            return
        derived = [rule for rule in plan.rules if rule.id_field is not None and not rule.skip]
        explicit_id = all(rule.id_source is not None for rule in derived)
        if not derived or explicit_id:
            return
        if previous is not None:
            error = key_change_error(
                stream,
                previous,
                keys,
                explicit_id=explicit_id,
                acknowledged=accepted(stream, self.settings.accept_key_property_changes),
            )
            if error is not None:
                raise StreamMappingError(error + where)
        if self.journal is not None and (previous is None or list(keys) != list(previous)):
            self.journal.remember_keys(stream, keys)

    def skip_message(self, kind: str, line: int, why: str, *, warn: bool = True) -> None:
        """A message that carries no usage, skipped: counted in the summary."""
        self.skipped_messages[kind] += 1
        if self.skipped_messages[kind] == 1 or warn:
            log = logger.warning if warn else logger.info
            log("line %d: skipping %s message (%s)", line, kind, why)

    def unused_rules(self) -> list[CompiledRule]:
        return [rule for rule in self.rules if rule.index not in self._rules_used]

    def check_unused_rules(self) -> None:
        """At the end of a complete run: a mapping that fired on no stream billed nothing,
        which is said as an unmatched stream is (an error unless unmatched_streams is
        skip). An unused skip rule is only named in the summary."""
        never = [rule for rule in self.unused_rules() if not rule.skip]
        if not never:
            return
        streams = sorted(self.plan_by_stream)
        listed = ", ".join(repr(s) for s in streams) or "none"
        problems = []
        for rule in never:
            shadowed = next(
                (
                    plan.rules[0]
                    for s, plan in self.plan_by_stream.items()
                    if plan and plan.skip and rule.matches(s)
                ),
                None,
            )
            if shadowed is not None:
                problems.append(f"{rule.where} fired on no stream ({shadowed.where} skips its streams first)")
                continue
            closest = difflib.get_close_matches(rule.stream_pattern, streams, n=1, cutoff=0.5)
            hint = f"; closest: {closest[0]!r}" if closest else ""
            problems.append(f"{rule.where} matched no stream (streams: {listed}{hint})")
        what = "; ".join(problems)
        if not streams:  # no SCHEMA at all (a tap with nothing to send): nothing was misrouted
            logger.warning("%s: the input had no stream", what)
            return
        if self.settings.unmatched_streams == "skip":
            logger.warning("%s: it billed nothing (unmatched_streams is skip)", what)
            return
        msg = (
            f"{what}, so it billed nothing; fix its stream pattern, remove it, or set "
            "unmatched_streams to skip"
        )
        raise UnmatchedStreamError(msg)

    def check_resend(self, stream: str, tally: t.Any) -> set[str]:
        """Before a batch is sent: the ids of it not to send again, or a stop (horizon.py)."""
        assert self.horizon is not None
        force = self.settings.allow_resend_beyond_dedup_window
        return self.horizon.screen(stream, tally, self.stats.stream(stream), self.destination.label, force)

    @property
    def refused(self) -> ResendBeyondWindowError | None:
        """A batch the re-send check refused (the run ends with it however it stops)."""
        return self.horizon.refused if self.horizon is not None else None

    # --- rejections --------------------------------------------------------------------

    def reject(
        self,
        stream: str,
        record: t.Any,
        stage: str,
        rejection: MappingRejection,
        *,
        line: int | None,
        payload: t.Any = None,
        mapping: str | None = None,
        **details: t.Any,
    ) -> None:
        if mapping is not None:  # the mapping that rejected it (none: the record as a whole)
            details["mapping"] = mapping
        self.dead_letters.write(
            stream=stream,
            record=record,
            stage=stage,
            reason=str(rejection),
            line=line,
            field=rejection.field,
            expression=rejection.expression,
            payload=payload,
            **details,
        )
        self.stats.add_rejected(stream, stage, str(rejection), mapping)
        self.check_rejection_limits(final=False)

    def check_rejection_limits(self, *, final: bool) -> None:
        settings = self.settings
        rejected = self.stats.total("rejected")
        if settings.max_rejected_records is not None and rejected > settings.max_rejected_records:
            msg = (
                f"{rejected} records rejected, over max_rejected_records={settings.max_rejected_records}"
                f"{self._dead_letter_hint()}"
            )
            raise RejectionLimitError(msg)
        if settings.max_rejected_ratio is None or not rejected:
            return
        # Records refused by the API were counted as mapped when they were batched.
        considered = self.stats.total("mapped") + rejected - self.stats.total("rejected_by_api")
        if considered and (final or considered >= MIN_RECORDS_FOR_RATIO):
            ratio = rejected / considered
            if ratio > settings.max_rejected_ratio:
                msg = (
                    f"{rejected} of {considered} mappable records rejected ({ratio:.1%}), over "
                    f"max_rejected_ratio={settings.max_rejected_ratio:g}{self._dead_letter_hint()}"
                )
                raise RejectionLimitError(msg)

    def _dead_letter_hint(self) -> str:
        return f"; see {self.dead_letters.path}"

    # --- STATE -------------------------------------------------------------------------

    def state_received(self, state: t.Any) -> None:
        """A STATE after ``records_seen`` records: released once they are all done."""
        if state:  # an empty STATE is never emitted
            self.delivery.add_state(state, self.records_seen)

    def send_oldest_buffers(self) -> None:
        """Hand over the oldest partial batches until the buffers fit their budget."""
        while self.buffered_bytes > self.buffer_budget and self.open_buffers:
            next(iter(self.open_buffers.values()))()  # removes itself from open_buffers

    def flush_due(self) -> bool:
        """Whether buffered records should be handed over so that pending STATEs can go.

        Full batches go at once; this bounds how long a partial batch (and so the STATE
        after it, and the usage in it) waits: at most ``state_checkpoint_seconds``.
        """
        return time.monotonic() >= self._next_flush and (
            self.delivery.has_pending_states or self.delivery.has_buffered
        )

    def seconds_until_flush(self) -> float | None:
        """How long input may stay idle before buffered usage must go; None: nothing waits.

        Only buffered usage needs the reading thread: a STATE waiting on requests in
        flight is released by the delivery workers when they are acknowledged.
        """
        if not self.delivery.has_buffered:
            return None
        return max(0.0, self._next_flush - time.monotonic())

    def flushed(self) -> None:
        self._next_flush = time.monotonic() + self.checkpoint_seconds

    def _emit_states(self, states: list[t.Any]) -> None:
        if self.dry_run is not None:
            # Nothing was billed: a STATE would move the tap's bookmark past usage that
            # the next real run then never sees.
            self.states_withheld += len(states)
            return
        # Dead letters first: a STATE must never cover a rejection that is not on disk.
        self.dead_letters.sync()
        lines = []
        for state in states:
            line = state_encoder.encode(state)  # the value alone, as Singer targets write it
            if line != self._last_emitted:
                lines.append(line)
                self._last_emitted = line
        if not lines:
            return
        with self._stdout_lock:
            out = sys.stdout.buffer
            try:
                out.write(b"".join(line + b"\n" for line in lines))
                out.flush()
            except OSError as exc:  # BrokenPipeError above all: the reader went away
                raise _stdout_error(exc) from None
            self.states_emitted += len(lines)
        logger.debug("Emitted STATE %s", lines[-1].decode())

    @property
    def last_state_emitted(self) -> bytes | None:
        """The last STATE written to stdout (its JSON text), None before the first."""
        return self._last_emitted if self.states_emitted else None

    def close(self, *, clean: bool = False) -> None:
        """``clean``: the input ended and everything was delivered, so what was
        acknowledged after the last STATE goes into the journal too."""
        self.finished.set()
        if self.journal is not None:
            try:
                if clean and self.delivery.failure is None:
                    self.journal.commit()
                self.journal.finish("succeeded" if clean and self.delivery.failure is None else "failed")
            except JournalError as exc:
                if self.delivery.failure is None:
                    self.delivery.failure = exc
            self.journal.store.close()
        self.delivery.close()
        self.transport.close_connections()  # the reading thread's (credential check)
        if self.dry_run is not None:
            self.dry_run.close()
        self.dead_letters.close()  # raises OutputError if a rejection could not be written


def _stdout_error(exc: OSError) -> OutputError:
    # What is left in Python's buffer would fail again at exit, with a traceback-like
    # "Exception ignored" message: the STATE goes nowhere from now on.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass
    if isinstance(exc, BrokenPipeError):
        why = "stdout was closed early (broken pipe): whatever reads this target's output stopped reading"
    else:
        why = f"stdout: cannot write a STATE ({exc.strerror or type(exc).__name__})"
    return OutputError(
        f"{why}; usage sent since the last STATE written is re-sent from it next time (ids "
        "make that harmless)"
    )


_Output = t.TypeVar("_Output")


def _open_output(setting: str, kind: t.Callable[..., _Output], path: str, *args: t.Any) -> _Output:
    """Open an output file at start-up: an unwritable path is a settings error, not a crash."""
    try:
        return kind(path, *args)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{setting}: cannot write {path!r}: {reason}") from None


def open_journal(settings: Settings, destination: Destination, run_id: str) -> Journal:
    """The run journal the settings ask for; one that cannot be opened stops the run at start."""
    try:
        store = open_store(settings.journal_url, settings.journal_path, settings.dead_letter_path)
        return Journal(
            store,
            destination.journal_scope(),
            destination.journal_layout(),
            sample_rate=settings.journal_sample_rate,
            run_id=run_id,
        )
    except JournalError as exc:
        raise ConfigError(str(exc)) from None


def _log_generated(what: str, function: t.Any) -> None:
    """The generated code of a rule or fan-out, under the file name tracebacks show."""
    logger.debug("%s: generated code %s:\n%s", what, function.filename, function.source)
