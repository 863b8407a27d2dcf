"""Delivery: batches in flight, content rejections isolated, STATE only when safe.

The sink hands over batches of encoded payloads. Up to the current level (concurrency.py) of batches are
sent at once by worker threads, so reading never waits on a round trip unless that many
are outstanding (which also bounds memory).

STATE: every record read gets an index. A STATE that arrived after N records is
released once no record with an index below N is still pending — in a sink's buffer or
in a batch not yet acknowledged (a dead-lettered record is done at once). A batch that
failed stays pending forever, so no STATE beyond it is ever released, while every STATE
before it still is. STATEs are written in the order they arrived.
"""

from __future__ import annotations

import collections
import decimal
import logging
import os
import queue
import threading
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

import msgspec

from target_usage_billing import outputs
from target_usage_billing.concurrency import CONGESTION_STATUSES, AdaptiveLimit, Answer
from target_usage_billing.deadletter import DeadLetters
from target_usage_billing.destinations.base import Destination, Ruling, Verdict
from target_usage_billing.errors import (
    CredentialsError,
    DeliveryError,
    InterruptedRun,
    JournalError,
    UsageBillingError,
    drop_frames,
)
from target_usage_billing.http import HttpTransport
from target_usage_billing.journal import Journal, Recount, Tally
from target_usage_billing.ratelimit import RateLimiter
from target_usage_billing.retry import (
    RetryableFailure,
    RetryBudgetExhausted,
    retry_after_seconds,
    retryable_status,
)
from target_usage_billing.stats import RunStats

logger = logging.getLogger("target-usage-billing.delivery")


_line_decoder = msgspec.json.Decoder(float_hook=decimal.Decimal)


# One mapped payload, with what a dead-letter line needs if the API refuses it:
# (body: the payload JSON-encoded once, input line it came from (holds the original
# record), line number, label of the mapping that made it). A plain tuple: one is made
# per payload, and a NamedTuple's constructor costs fifteen times as much. One record
# billed by several mappings is several items with one line number (and one record
# index for STATE: a buffer or batch starting with any of them holds that STATE back).
Item = tuple[bytes, bytes | bytearray | str, int | None, str]
BODY: t.Final = 0
LINE_TEXT: t.Final = 1
LINE_NUMBER: t.Final = 2
MAPPING: t.Final = 3


def original_record(item: Item) -> tuple[t.Any, dict[str, t.Any]]:
    """The record as the tap sent it, decoded again from the input line (rare path), and
    where it came from when that was a BATCH file (``batch_file``, ``batch_row``).

    Items keep the raw line rather than the decoded record: a bytes object is invisible
    to the garbage collector, while thousands of buffered dicts made it rescan them
    over and over (about a fifth of the run time).
    """
    try:
        message = _line_decoder.decode(item[LINE_TEXT])
    except msgspec.DecodeError:
        return None, {}
    if not isinstance(message, dict):
        return None, {}
    location = {key: message[key] for key in ("batch_file", "batch_row", "replay") if key in message}
    return message.get("record"), location


@dataclass(frozen=True)
class Batch:
    seq: int
    stream: str
    items: list[Item]
    first_index: int  # the record index of its first item
    # STATEs received when its first record arrived: STATE number epoch+1 covers part or
    # all of it, and the journal holds it before that STATE is written
    epoch: int
    tally: Tally | None = None  # the journal's count of it, made by the sink
    held_bytes: int = 0  # what its items hold in memory (the in-flight budget)


class DryRunWriter:
    """Writes the exact request bodies to a JSONL file instead of sending them (whole
    lines only: a full disk stops the run naming dry_run_path, see outputs.py)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._fd = outputs.open_append(self.path)
        self._lock = threading.Lock()

    def write(self, destination: str, path: str, count: int, body: bytes) -> None:
        head = msgspec.json.encode(
            {"destination": destination, "method": "POST", "path": path, "items": count}
        )
        line = head[:-1] + b',"body":' + body + b"}\n"
        with self._lock:
            outputs.append_line(self._fd, line, "dry_run_path", self.path)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


class Delivery:
    def __init__(
        self,
        destination: Destination,
        transport: HttpTransport,
        limiter: RateLimiter,
        dead_letters: DeadLetters,
        stats: RunStats,
        *,
        max_in_flight: int,
        adaptive_in_flight: bool = True,
        on_states: t.Callable[[list[dict]], None],
        on_api_rejection: t.Callable[[], None] = lambda: None,
        key_properties: t.Mapping[str, t.Sequence[str]] | None = None,
        dry_run: DryRunWriter | None = None,
        journal: Journal | None = None,
    ):
        self.destination = destination
        self.transport = transport
        self.limiter = limiter
        self.dead_letters = dead_letters
        self.stats = stats
        self.dry_run = dry_run
        self.journal = journal
        self._on_states = on_states
        # called after each item the API refused; raises to stop splitting (rejection limits)
        self._on_api_rejection = on_api_rejection
        self._key_properties = key_properties if key_properties is not None else {}
        # a pause the platform asks for is cut, as each retry's wait is, to the retry budget
        self.limit = AdaptiveLimit(
            max_in_flight, adaptive=adaptive_in_flight, max_pause_seconds=transport.retry_budget_seconds
        )
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._all_done = threading.Condition(self._lock)
        self._next_seq = 0
        # the first record index of each pending batch and of each non-empty sink buffer
        self._in_flight_first: dict[int, int] = {}
        self._buffered_first: dict[int, int] = {}
        # the lowest first record index of the batches delivered into unsettled channels
        self._held_first: int | None = None
        # (bound, state, its number): STATE number n covers batches of epochs below n
        self._states: collections.deque[tuple[int, dict, int]] = collections.deque()
        self._states_received = 0
        self._buffer_epoch: dict[int, int] = {}  # epoch of each non-empty sink buffer
        self.failure: UsageBillingError | None = None
        self.in_flight = 0
        # Set on SIGTERM/SIGINT: past it, nothing waits for delivery any more.
        self.stop_deadline: float | None = None
        self._frozen = False
        self._workers = [
            threading.Thread(target=self._work, name=f"delivery-{n}", daemon=True)
            for n in range(max_in_flight)
        ]
        for worker in self._workers:
            worker.start()

    # --- called by the reading thread --------------------------------------------------

    def buffer_started(self, buffer: int, first_index: int) -> None:
        """A sink buffer (identified by ``buffer``) received its first record."""
        with self._lock:
            self._buffered_first[buffer] = first_index
            self._buffer_epoch[buffer] = self._states_received

    def submit(
        self,
        stream: str,
        items: list[Item],
        buffer: int,
        first_index: int,
        tally: Tally | None = None,
        held_bytes: int = 0,
    ) -> None:
        """Queue a batch; blocks while as many batches are outstanding as the current
        level of requests in flight allows (see concurrency.py)."""
        self.raise_if_failed()
        while not self.limit.acquire(timeout=0.2, size=held_bytes):
            self.raise_if_failed()
            if self.stop_deadline is not None and time.monotonic() >= self.stop_deadline:
                raise InterruptedRun("the shutdown grace period ended while requests were still failing")
        with self._lock:
            epoch = self._buffer_epoch.pop(buffer, self._states_received)
            batch = Batch(self._next_seq, stream, items, first_index, epoch, tally, held_bytes)
            self._next_seq += 1
            self.in_flight += 1
            self._in_flight_first[batch.seq] = first_index
            self._buffered_first.pop(buffer, None)
        self._queue.put(batch)

    def buffer_done(self, buffer: int) -> None:
        """A sink buffer ended with nothing to send (every item in it was done already)."""
        with self._lock:
            self._buffered_first.pop(buffer, None)
            self._buffer_epoch.pop(buffer, None)
            self._release_states()

    def add_state(self, state: dict, bound: int) -> None:
        """Release ``state`` once every record with an index below ``bound`` is done.

        At most two STATEs wait, whatever the tap writes: the next to go out and the
        latest, which replaces the one before it (a STATE stands for all earlier ones).
        """
        with self._lock:
            self._states_received += 1
            if len(self._states) > 1:  # the latest replaces the one between: bounded memory
                self._states.pop()
            self._states.append((bound, state, self._states_received))
            if self.journal is not None:  # what this STATE will commit is kept as one epoch
                head = self._states[0][2] if len(self._states) > 1 else None
                self.journal.merge_epochs(head, self._states_received)
            self._release_states()

    @property
    def has_pending_states(self) -> bool:
        return bool(self._states)

    @property
    def has_buffered(self) -> bool:
        return bool(self._buffered_first)

    def wait(self, deadline: float | None = None) -> bool:
        """Wait until every submitted batch is done, one failed, or a deadline passed.

        ``deadline`` (time.monotonic) or a later stop_deadline bound the wait.
        True when everything submitted is done.
        """
        with self._all_done:
            while self._in_flight_first and self.failure is None:
                limits = [d for d in (deadline, self.stop_deadline) if d is not None]
                if limits and time.monotonic() >= min(limits):
                    break
                self._all_done.wait(0.2)
            return not self._in_flight_first

    def freeze(self) -> None:
        """Emit no STATE from now on (the process is about to exit)."""
        with self._lock:
            self._frozen = True

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    def close(self, timeout: float = 2.0) -> None:
        """Stop the workers; each closes its connections. Busy ones (a stop cut their
        retries short) are waited for only ``timeout`` seconds in all."""
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    # --- worker side -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                self.transport.close_connections()
                return
            try:
                if self.failure is None:  # after a failure, stop sending: restart resends
                    self._send(batch)
            except UsageBillingError as exc:
                self._fail(exc)
            except Exception as exc:  # a bug must stop the run, not lose a batch silently
                logger.debug("Unexpected delivery error", exc_info=True)
                self._fail(DeliveryError(f"unexpected error while sending: {type(exc).__name__}: {exc}"))
            finally:
                with self._lock:
                    self.in_flight -= 1
                self.limit.release(batch.held_bytes)
            # An idle worker must not keep its last batch (items and input lines, counted in
            # no budget any more) alive while it waits: 64 workers held 64 MB on m3ter.
            del batch

    def _send(self, batch: Batch) -> None:
        routes = None
        if self.destination.uses_channels and self.dry_run is None:
            routes = self.destination.channels([item[BODY] for item in batch.items])
        if routes is None:
            self._deliver(batch, batch.items)
            self._mark_done(batch.seq)
        else:  # e.g. Orb: the older events into their backfills
            for channel, positions in routes:
                self._deliver(batch, [batch.items[i] for i in positions], channel)
            self._mark_done(batch.seq, held=any(c is not None for c, _ in routes))

    def _deliver(self, batch: Batch, items: list[Item], channel: str | None = None) -> None:
        """Send items (in ``channel``, see Destination.channels); on a content rejection,
        bisect until the bad items are isolated."""
        stream = batch.stream
        self.raise_if_failed()  # e.g. the rejection limit was crossed while splitting
        body = self.destination.envelope([item[BODY] for item in items])
        self.stats.add_request(stream)
        if self.dry_run is not None:
            self.dry_run.write(self.destination.name, self.destination.ingest_path, len(items), body)
            self.stats.add_sent(stream, len(items), items)
            return
        ruling = self._post(stream, body, channel)
        if ruling.verdict is Verdict.ACCEPTED:
            self._journal(batch, items)
            self.stats.add_sent(stream, len(items), items)
            if channel is not None:
                self.destination.channel_acknowledged(channel, len(items))
                self.stats.add_channelled(stream, len(items))
            return
        if ruling.stored and all(0 <= i < len(items) for i in ruling.stored):
            # the platform named the items it already has: done; the others go once more
            stored = set(ruling.stored)
            held = [item for i, item in enumerate(items) if i in stored]
            self._journal(batch, held)
            for mapping, count in collections.Counter(item[MAPPING] for item in held).items():
                self.stats.add_already_stored(stream, mapping, count)
            rest = [item for i, item in enumerate(items) if i not in stored]
            if rest:
                self._deliver(batch, rest, channel)
            return
        if ruling.verdict is Verdict.ALREADY_STORED and len(items) == 1:
            self._journal(batch, items)  # the platform holds it (sent by a run that crashed)
            self.stats.add_already_stored(stream, items[0][MAPPING])  # billed by an earlier request: done
            return
        # REJECTED (or ALREADY_STORED with others in the request, which the platform then
        # did not take either): halve until single items are refused: about 2*log2(n)
        # extra requests per bad item, every good item still delivered.
        if len(items) == 1:
            item = items[0]
            record, location = original_record(item)
            keys = self._key_properties.get(stream)
            if keys and isinstance(record, dict):
                location["keys"] = {key: record.get(key) for key in keys}
            self.dead_letters.write(
                stream=stream,
                record=record,
                stage="api",
                reason=ruling.message,
                line=item[LINE_NUMBER],
                payload=msgspec.Raw(item[BODY]),
                mapping=item[MAPPING],
                **location,
            )
            self.stats.add_rejected(stream, "api", ruling.message, item[MAPPING])
            self._on_api_rejection()
            return
        middle = len(items) // 2
        logger.info(
            "%s refused a batch of %d %s (%s); splitting it to isolate the bad ones",
            self.destination.label,
            len(items),
            self.destination.item_noun,
            ruling.message[:200],
        )
        self._deliver(batch, items[:middle], channel)
        self._deliver(batch, items[middle:], channel)

    def _journal(self, batch: Batch, items: list[Item]) -> None:
        journal = self.journal
        if journal is None:
            return
        if items is batch.items and batch.tally is not None:  # delivered whole: as the sink counted it
            try:
                journal.acknowledged_tally(batch.stream, batch.tally, batch.epoch, batch.first_index)
                return
            except Recount:
                pass
        bodies = [item[BODY] for item in items]  # a part of a split batch: counted from its bodies
        journal.acknowledged(batch.stream, bodies, batch.epoch, batch.first_index)

    def _post(self, stream: str, body: bytes, channel: str | None = None) -> Ruling:
        destination = self.destination
        what = f"{destination.label} POST {destination.ingest_path}"
        renewed = False
        tries = 0

        def attempt() -> Ruling:
            nonlocal renewed, tries
            tries += 1
            if tries > 1:
                self.stats.add_retry(stream)
            # the platform is refusing and a probe is out: wait for its answer (a stop's grace
            # period is the reading thread's to end, as during any retry's wait)
            while not self.limit.clear_to_send(timeout=0.2):
                self.raise_if_failed()
            try:
                if channel is None:
                    request = destination.ingest_request(body)
                else:
                    request = destination.channel_request(body, channel)
                # the slot is taken last, as close to the wire as can be (the platform counts arrivals)
                waited = self.limiter.acquire()
                self.transport.stats.throttled(waited)
                saturated = self.limit.saturated()
                started = time.monotonic()
                try:
                    response = self.transport.send_once(
                        request.method, request.url, request.headers, request.body
                    )
                except RetryableFailure:  # a timeout or a dropped connection: the platform is struggling
                    self.limit.observe(Answer(time.monotonic() - started, congested=True))
                    raise
                self.limit.observe(
                    Answer(
                        time.monotonic() - started,
                        congested=response.status in CONGESTION_STATUSES or "retry-after" in response.headers,
                        rate_limited=waited > 0,
                        saturated=saturated,
                        retry_after=retry_after_seconds(response.headers),
                    )
                )
            finally:
                self.limit.sent()
            ruling = destination.judge(response)
            if ruling.verdict is Verdict.RETRY:
                raise retryable_status(response, what) or RetryableFailure(ruling.message)
            if ruling.verdict is Verdict.DENIED:
                raise CredentialsError(ruling.message)
            if ruling.verdict is Verdict.REAUTH:
                if renewed and not destination.renewal_checks_credentials:
                    raise CredentialsError(destination.reauth_failed_message(response.status))
                destination.refresh_credentials(request)
                # the first renewal resends at once; later ones back off, within the budget
                retry_after = None if renewed else 0
                renewed = True
                raise RetryableFailure(f"{ruling.message}; renewing credentials", retry_after=retry_after)
            if ruling.verdict is Verdict.FATAL:
                raise DeliveryError(ruling.message)
            return ruling

        try:
            return self.transport.with_retries(attempt, what)
        except RetryBudgetExhausted as exc:
            raise DeliveryError(str(exc)) from None

    def _mark_done(self, seq: int, *, held: bool = False) -> None:
        """``held``: delivered into a channel that counts only once settled (an Orb
        backfill before its close): no STATE goes past it until then."""
        with self._lock:
            first = self._in_flight_first.pop(seq)
            if held and (self._held_first is None or first < self._held_first):
                self._held_first = first
            self._release_states()
            self._all_done.notify_all()

    def settle_channels(self, succeeded: bool) -> None:
        """End of the run: the destination settles its channels (closes Orb's backfills
        when ``succeeded``, else reverts them); then the STATEs they held back may go."""
        try:
            self.destination.settle_channels(succeeded and self.failure is None)
        except UsageBillingError as exc:
            self._fail(exc)
            return
        if succeeded and self.failure is None:
            with self._lock:
                self._held_first = None
                self._release_states()

    def _release_states(self) -> None:
        # Called with the lock held, so STATEs are written in order and never concurrently.
        if self._frozen or not self._states:
            return
        pending = [*self._in_flight_first.values(), *self._buffered_first.values()]
        if self._held_first is not None:
            pending.append(self._held_first)
        frontier = min(pending) if pending else None  # lowest record index not yet done
        ready = []
        covered = 0  # the number of the last STATE released
        while self._states and (frontier is None or self._states[0][0] <= frontier):
            _bound, state, covered = self._states.popleft()
            ready.append(state)
        if ready:
            if self.journal is not None:
                try:  # what the STATEs cover is in the journal before they are written
                    self.journal.commit(before_epoch=covered)
                except JournalError as exc:
                    if self.failure is None:
                        self.failure = exc
                    self._frozen = True
                    self._all_done.notify_all()
                    return
            self._on_states(ready)

    def _fail(self, exc: UsageBillingError) -> None:
        drop_frames(exc)  # kept until the run ends: not the batch its frames held
        with self._lock:
            if self.failure is None:
                self.failure = exc
            self._all_done.notify_all()
