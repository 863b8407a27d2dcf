"""The sink: maps each record once, buffers encoded payloads, cuts exact-size batches.

It knows nothing of HTTP: full batches are handed to the delivery pipeline. Batches are
cut here, before the limit would be crossed, rather than by the SDK's ``is_full`` (which
is checked after a record is added and so can overshoot a byte limit by one record).
"""

from __future__ import annotations

import typing as t

from singer_sdk.exceptions import InvalidRecord
from singer_sdk.sinks import BatchSink

from target_usage_billing.delivery import Item
from target_usage_billing.destinations.base import Destination
from target_usage_billing.diagnostics import SampleWatch, check_schema
from target_usage_billing.ledger import DUPLICATE
from target_usage_billing.mapping import MappingRejection, payload_encoder

if t.TYPE_CHECKING:
    from target_usage_billing.target import TargetUsageBilling


_encode = payload_encoder.encode  # mapping.encode_payload without its call frame


class UsageSink(BatchSink):
    """One per stream: record -> payload (or rejection) -> batch."""

    def __init__(self, target: TargetUsageBilling, *args: t.Any, **kwargs: t.Any):
        super().__init__(target, *args, **kwargs)
        self.run = target.run_context
        # before any record of the stream: a stream no rule matches stops the run here
        self.rule = self.run.rule_for(self.stream_name)
        self._id_field = self.rule.id_field if self.rule is not None else None
        self._watch: SampleWatch | None = None
        if self.rule is not None and not self.rule.skip:
            undecided = check_schema(self.stream_name, self.rule, self.schema)
            if undecided:
                self._watch = SampleWatch(self.stream_name, self.rule, undecided)
        self._ledger = self.run.ledger
        self._ledger_check = self._ledger.check
        self.counts = self.run.stats.stream(self.stream_name)
        self._items: list[Item] = []
        self._item_bytes = 0
        self._first_index = 0  # index of the buffer's first record (for STATE release)
        self._schema_error: str | None = None
        self._direct_uncounted = 0  # direct-path records not yet in the SDK's record counter
        destination = self.run.destination
        self._max_items = self.run.max_items_per_request
        self._max_body = self.run.max_body_bytes
        # body size = envelope + items + one comma between each two items
        self._envelope = destination.envelope_overhead
        validate = destination.validate_payload
        self._validate = (
            validate if type(destination).validate_payload is not Destination.validate_payload else None
        )
        self._keys = tuple(self.key_properties or ())
        self.run.key_properties[self.stream_name] = self._keys
        self._show_first = self.run.dry_run is not None  # the dry-run summary shows one payload
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

    def _validate_and_parse(self, record: dict) -> dict:
        # The SDK stops the whole run on one record that breaks its schema; here that
        # record is dead-lettered and the run goes on. Date-time strings are not parsed
        # here: the mapping parses the fields it uses (and rejects bad ones by name).
        if self._validator is not None:
            self._schema_error = None
            try:
                self._validator.validate(record)
            except InvalidRecord as exc:
                self._schema_error = str(exc).splitlines()[0]
        return record

    def process_direct(self, record: dict) -> None:
        """The record path when no stream map applies: only the SDK steps that matter.

        Same checks and bookkeeping as the SDK's path (key properties, validation when
        on, the batch tally its drains rely on) without the per-record copies, metadata
        handling and metrics that cost more than the mapping itself.
        """
        for key in self._keys:
            if key not in record:
                self._singer_validate_message(record)  # raises the SDK's error
        if self._validator is not None:
            self._validate_and_parse(record)
        self._batch_records_read += 1
        self._direct_uncounted += 1
        self.process_record(record, None)  # type: ignore[arg-type]

    def process_record(self, record: dict, context: dict) -> None:
        counts = self.counts
        counts.read += 1
        rule = self.rule
        if rule is None or rule.skip:
            counts.unmapped += 1
            return
        if self._watch is not None and not self._watch.observe(record):
            self._watch = None
        if self._schema_error is not None:
            self._reject(record, "schema", MappingRejection(self._schema_error))
            return
        try:
            payload = rule.apply(record, self.stream_name, self._keys)
        except MappingRejection as rejection:
            self._reject(record, "mapping", rejection)
            return
        if payload is None:
            counts.filtered += 1
            return
        reason = self._validate(payload) if self._validate is not None else None
        body = _encode(payload)
        size = len(body)
        if reason is None and self._envelope + size > self._max_body:
            reason = (
                f"payload is {size} bytes: alone it would make a request body over the "
                f"{self._max_body}-byte limit"
            )
        if reason is not None:
            # the record is kept whole; a payload too large to send is not copied beside it
            kept = payload if size <= self._max_body else None
            self._reject(record, "validation", MappingRejection(reason), payload=kept)
            return
        if self._id_field is not None:
            item_id = payload.get(self._id_field)
            seen = self._ledger_check(item_id, body)
            if seen:
                if seen == DUPLICATE:  # the same event again: sent once is enough
                    counts.duplicates += 1
                    return
                self._reject_conflict(record, payload, item_id, self._ledger.first_body_hash, body)
                return
        if self._show_first:
            self._show_first = False
            self.run.first_payloads.setdefault(self.stream_name, payload)
        items = self._items
        if items and (
            len(items) >= self._max_items
            or self._envelope + self._item_bytes + size + len(items) > self._max_body
        ):
            self._hand_over()
            items = self._items
        if not items:
            self._first_index = self.run.records_seen - 1
            self.run.delivery.buffer_started(id(self), self._first_index)
        reader = self._reader
        items.append((body, reader.current_line, reader.line_number))  # an Item
        self._item_bytes += size
        counts.mapped += 1
        if len(items) >= self._max_items:
            self._hand_over()

    def _reject(self, record: dict, stage: str, rejection: MappingRejection, **details: t.Any) -> None:
        reader = self._reader
        if self._keys and type(record) is dict:
            details["keys"] = {key: record.get(key) for key in self._keys}
        self.run.reject(
            self.stream_name,
            record,
            stage,
            rejection,
            line=reader.line_number,
            **details,
            **reader.batch_location,
        )

    def _reject_conflict(self, record: dict, payload: dict, item_id: str, first: int, body: bytes) -> None:
        platform = self.run.destination.label
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
        )

    def _hand_over(self) -> None:
        if self._direct_uncounted:  # the SDK's record_count METRIC, fed per batch
            self.record_counter_metric.increment(self._direct_uncounted)
            self._direct_uncounted = 0
        items = self._items
        self._items = []
        self._item_bytes = 0
        if items:
            self.run.delivery.submit(self.stream_name, items, id(self), self._first_index)

    def process_batch(self, context: dict) -> None:
        # The SDK drains at end of input, at checkpoints and on schema changes.
        self._hand_over()
