"""The sink: maps each record once, buffers encoded payloads, cuts exact-size batches.

It knows nothing of HTTP: full batches are handed to the delivery pipeline. Batches are
cut here, before the limit would be crossed, rather than by the SDK's ``is_full`` (which
is checked after a record is added and so can overshoot a byte limit by one record).
"""

from __future__ import annotations

import logging
import typing as t

from singer_sdk.exceptions import MissingKeyPropertiesError
from singer_sdk.sinks import BatchSink

from target_usage_billing.delivery import Item
from target_usage_billing.destinations.base import Destination, OutsideWindow
from target_usage_billing.diagnostics import SampleWatch, check_schema
from target_usage_billing.journal_tally import Bodies
from target_usage_billing.ledger import DUPLICATE
from target_usage_billing.mapping import MappingRejection, payload_encoder
from target_usage_billing.sdk_overrides import RecordCheck
from target_usage_billing.stats import MappingStats

if t.TYPE_CHECKING:
    from target_usage_billing.target import TargetUsageBilling


logger = logging.getLogger("target-usage-billing")
_encode = payload_encoder.encode  # mapping.encode_payload without its call frame
# What a buffered item costs beside its two byte strings: the tuple, its list slot, the
# strings' headers and the line number (counted against buffer_megabytes).
ITEM_OVERHEAD = 170
# What the run journal's count of a buffered item holds: its id and, at worst, a customer,
# meter and hour of its own (tests/test_journal_tally.py measures it).
TALLY_ITEM_OVERHEAD = 1000


# the context process_direct hands process_record (the SDK's is an empty dict too)
_DIRECT: dict = {}


class UsageSink(RecordCheck, BatchSink):
    """One per stream: record -> payload (or rejection) -> batch."""

    def __init__(self, target: TargetUsageBilling, *args: t.Any, **kwargs: t.Any):
        super().__init__(target, *args, **kwargs)
        self.billing_run = target.billing_run
        self.record_validator = self.get_validator()
        self.schema_error: str | None = None  # set by RecordCheck when validation is on
        # before any record of the stream: a stream no rule matches stops the run here
        self.plan = self.billing_run.plan_for(self.stream_name)
        # the first mapping that fires (the only one unless the stream fans out)
        self.rule = self.plan.rules[0] if self.plan is not None else None
        self._id_field = self.rule.id_field if self.rule is not None else None
        self._label = self.rule.label if self.rule is not None else ""
        self.counts = self.billing_run.stats.stream(self.stream_name)
        self._fanout = None  # the plan's function over every mapping, when there are several
        self._watches: list[SampleWatch] = []
        if self.plan is not None and not self.plan.skip:
            for rule in self.plan.rules:
                undecided = check_schema(self.stream_name, rule, self.schema)
                if undecided:
                    self._watches.append(SampleWatch(self.stream_name, rule, undecided))
            if self.plan.fans_out:
                self._fanout = self.plan.apply
                self.counts.mappings = {rule.label: MappingStats() for rule in self.plan.rules}
        self._ledger = self.billing_run.ledger
        self._ledger_check = self._ledger.check
        self._items: list[Item] = []
        # the run journal's count of the buffer, made from the payloads at hand
        self._journal = self.billing_run.journal
        self._tally = self._journal.tally(self.stream_name) if self._journal is not None else None
        self._item_bytes = 0
        self._held_bytes = 0  # what the buffer holds: bodies and input lines
        self._item_overhead = ITEM_OVERHEAD + (TALLY_ITEM_OVERHEAD if self._tally is not None else 0)
        self._first_index = 0  # index of the buffer's first record (for STATE release)
        self._direct_uncounted = 0  # direct-path records not yet in the SDK's record counter
        destination = self.billing_run.destination
        self._max_items = self.billing_run.max_items_per_request
        self._max_body = self.billing_run.max_body_bytes
        # body size = envelope + items + one comma between each two items
        self._envelope = destination.envelope_overhead
        validate = destination.validate_payload
        self._validate = (
            validate if type(destination).validate_payload is not Destination.validate_payload else None
        )
        self._keys = tuple(self.key_properties or ())
        self.billing_run.key_properties[self.stream_name] = self._keys
        # mappings whose first payload the dry-run summary still lacks
        self._show_first = (
            {rule.label for rule in self.plan.rules}
            if self.billing_run.dry_run is not None and self.plan is not None
            else set()
        )
        self._reader = target.message_reader

    @property
    def is_full(self) -> bool:
        return False  # batches are cut in process_record, exactly at the limits

    def get_validator(self) -> t.Any:
        # The mapped payload is checked field by field, so JSON-Schema validation of the
        # tap's record is off unless validate_records asks for it (it costs ~80% of the
        # SDK's per-record time).
        if self.config.get("validate_records", False):
            return super().get_validator()
        return None

    def process_direct(self, record: dict) -> None:
        """The target's direct path for one record (target._on_record: no stream maps,
        flattening or record metadata): the checks and bookkeeping of the SDK's path (key
        properties, validation when on, the count its record_count metric is fed), without
        the per-record copies, metadata handling and metrics that cost more than the
        mapping itself; then mapped as ``process_record`` maps it."""
        for key in self._keys:
            if key not in record:
                msg = (  # the SDK's own words for it
                    "Record is missing one or more key_properties. \n"
                    f"Key Properties: {list(self._keys)}, Record Keys: {list(record.keys())}"
                )
                raise MissingKeyPropertiesError(msg)
        if self.record_validator is not None:
            self._validate_and_parse(record)
        self._direct_uncounted += 1
        self.process_record(record, _DIRECT)

    def process_record(self, record: dict, context: dict) -> None:
        """Map one record and buffer its payload (or dead-letter the record).

        The SDK calls this after its own checks (``context`` is the SDK's, unused);
        ``process_direct`` after the same checks made for the direct path.
        """
        counts = self.counts
        counts.read += 1
        rule = self.rule
        if rule is None or rule.skip:
            counts.unmapped += 1
            return
        if self._watches:
            self._watches = [watch for watch in self._watches if watch.observe(record)]
        if self.schema_error is not None:
            self._reject(record, "schema", MappingRejection(self.schema_error))
            return
        if self._fanout is not None:
            self._fan_out(record)
            return
        try:
            payload = rule.apply(record, self.stream_name, self._keys)
        except MappingRejection as rejection:
            self._reject(record, "mapping", rejection, mapping=rule.label)
            return
        if payload is None:
            counts.filtered += 1
            return
        self._add(record, payload, self._label, None)

    def _fan_out(self, record: dict) -> None:
        """Every mapping of the stream on one record: each payload, filtering or rejection
        is that mapping's alone (one record read, one record index for STATE)."""
        counts = self.counts
        outcomes = self._fanout(record, self.stream_name, self._keys)  # type: ignore[misc]
        only = self._reader.replay_mapping  # --replay: the mapping that rejected it, alone
        for rule, outcome in zip(self.plan.rules, outcomes):  # type: ignore[union-attr]
            label = rule.label
            if only is not None and label != only and only in self.counts.mappings:
                continue
            if outcome is None:
                counts.filtered += 1
                counts.mappings[label].filtered += 1
            elif type(outcome) is dict:
                self._add(record, outcome, label, counts.mappings[label])
            else:
                self._reject(record, "mapping", outcome, mapping=label)

    def _add(self, record: dict, payload: t.Any, label: str, share: MappingStats | None) -> None:
        """Check, de-duplicate and buffer one payload (``share``: its mapping's counts)."""
        counts = self.counts
        reason = self._validate(payload) if self._validate is not None else None
        body = _encode(payload)
        size = len(body)
        if reason is None and self._envelope + size > self._max_body:
            reason = (
                f"payload is {size} bytes: alone it would make a request body over the "
                f"{self._max_body}-byte limit"
            )
        if reason is not None:
            if type(reason) is OutsideWindow:
                self._outside_window(str(reason))
            # the record is kept whole; a payload too large to send is not copied beside it
            kept = payload if size <= self._max_body else None
            self._reject(record, "validation", MappingRejection(reason), payload=kept, mapping=label)
            return
        if self._id_field is not None:
            item_id = payload.get(self._id_field)
            seen = self._ledger_check(item_id, body)
            if seen:
                if seen == DUPLICATE:  # the same event again: sent once is enough
                    counts.duplicates += 1
                    if share is not None:
                        share.duplicates += 1
                    return
                self._reject_conflict(record, payload, item_id, self._ledger.first_body_hash, body, label)
                return
        if self._show_first and label in self._show_first:
            self._show_first.discard(label)
            self.billing_run.first_payloads.setdefault((self.stream_name, label), payload)
        items = self._items
        if items and (
            len(items) >= self._max_items
            or self._envelope + self._item_bytes + size + len(items) > self._max_body
        ):
            self._hand_over()
            items = self._items
        run = self.billing_run
        if not items:
            self._first_index = run.records_seen - 1
            run.delivery.buffer_started(id(self), self._first_index)
            run.open_buffers[id(self)] = self._hand_over
            # the SDK drains (end of input, checkpoints) only sinks that tallied a record
            self.tally_record_read()
        reader = self._reader
        line = reader.current_line
        items.append((body, line, reader.line_number, label))  # an Item
        if self._tally is not None:
            self._tally.add(payload, body)
        self._item_bytes += size
        held = size + len(line) + self._item_overhead  # an item keeps its input line too
        self._held_bytes += held
        run.buffered_bytes += held
        counts.mapped += 1
        if share is not None:
            share.mapped += 1
        if len(items) >= self._max_items:
            self._hand_over()
        elif run.buffered_bytes > run.buffer_budget:  # one budget for all streams' buffers
            run.send_oldest_buffers()

    def _outside_window(self, reason: str) -> None:
        """Usage the platform takes no more: counted, and said once per stream."""
        counts = self.counts
        counts.outside_window += 1
        if counts.outside_window == 1:
            logger.warning(
                "Stream '%s': records outside %s's time window are dead-lettered (stage validation, "
                "in %s), not sent: %s; the summary counts them",
                self.stream_name,
                self.billing_run.destination.label,
                self.billing_run.dead_letters.path,
                reason.split(", got ", 1)[0],
            )

    def _reject(self, record: dict, stage: str, rejection: MappingRejection, **details: t.Any) -> None:
        reader = self._reader
        if self._keys and type(record) is dict:
            details["keys"] = {key: record.get(key) for key in self._keys}
        self.billing_run.reject(
            self.stream_name,
            record,
            stage,
            rejection,
            line=reader.line_number,
            **details,
            **reader.batch_location,
        )

    def _reject_conflict(
        self, record: dict, payload: dict, item_id: str, first: int, body: bytes, label: str
    ) -> None:
        platform = self.billing_run.destination.label
        reason = (
            f"id {item_id!r} was already sent in this run with a different body: {platform} keeps "
            "the first and would drop this one without a word; give each usage event its own id "
            "(see Corrections in the README)"
        )
        self._reject(
            record,
            "conflict",
            MappingRejection(reason, self._id_field),
            payload=payload,
            id=item_id,
            sent_body_digest=f"{first & (2**64 - 1):016x}",
            body_digest=f"{hash(body) & (2**64 - 1):016x}",
            mapping=label,
        )

    def _hand_over(self) -> None:
        if self._direct_uncounted:  # the SDK's record_count METRIC, fed per batch
            self.record_counter_metric.increment(self._direct_uncounted)
            self._direct_uncounted = 0
        items = self._items
        self._items = []
        self._item_bytes = 0
        tally = self._tally
        if self._journal is not None:
            self._tally = self._journal.tally(self.stream_name)
        held, self._held_bytes = self._held_bytes, 0
        self.billing_run.buffered_bytes -= held
        if items:
            del self.billing_run.open_buffers[id(self)]
            if tally is not None and self._journal is not None:  # in input order, before the horizon
                self._journal.seal(tally, Bodies(items))
            if tally is not None and self.billing_run.horizon is not None:
                # raises before sending (the buffer stays unfinished: no STATE passes it)
                known = self.billing_run.check_resend(self.stream_name, tally)
                if known:  # billed before the platform's window: not again (tally.ids: one an item)
                    items = [item for item, item_id in zip(items, tally.ids) if item_id not in known]
                    tally = None  # the journal counts the rest from their bodies
                    if not items:
                        self.billing_run.delivery.buffer_done(id(self))
                        return
            delivery = self.billing_run.delivery
            delivery.submit(self.stream_name, items, id(self), self._first_index, tally, held)

    def process_batch(self, context: dict) -> None:
        # The SDK drains at end of input, at checkpoints and on schema changes.
        self._hand_over()
