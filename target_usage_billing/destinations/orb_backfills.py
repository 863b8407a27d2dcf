"""Orb's backfill flow, driven for one run of OrbDestination (``orb_backfill``).

Confirmed against orb-billing 4.90.0 (``events.backfills``: ``create``, ``close``,
``revert`` and their types): a backfill per customer and timeframe of at most 31 days,
its events ingested with ``?backfill_id=``, reflected (billed) only once closed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import typing as t
import uuid
from collections.abc import Sequence

import msgspec

from target_usage_billing.destinations.base import json_document
from target_usage_billing.destinations.readback import iso
from target_usage_billing.errors import DeliveryError, UsageBillingError

if t.TYPE_CHECKING:
    from target_usage_billing.destinations.orb import OrbDestination

logger = logging.getLogger("target-usage-billing.orb")

# A backfill's timeframe: at most 31 days (Orb's default limit). The target cuts time into
# fixed 31-day slots from the Unix epoch, so that every run asks for the same timeframes.
BACKFILL_DAYS = 31
BACKFILL_PATH = "/v1/events/backfills"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class _Routing(msgspec.Struct):
    """What routing an event needs of it (the rest of the body is skipped unread)."""

    timestamp: str
    customer_id: str | None = None
    external_customer_id: str | None = None


_routing_decoder = msgspec.json.Decoder(_Routing)


class _Backfill:
    __slots__ = ("closed", "customer", "end", "events", "id", "start")

    def __init__(self, backfill_id: str, customer: tuple[str, str], start: dt.datetime, end: dt.datetime):
        self.id = backfill_id
        self.customer = customer  # (customer_id | external_customer_id, value)
        self.start, self.end = start, end
        self.events = 0  # acknowledged into it
        self.closed = False

    def describe(self) -> str:
        return f"{self.id} ({self.customer[0]} {self.customer[1]!r}, {iso(self.start)} to {iso(self.end)})"


class Backfills:
    """The backfills of one run: opened when an event older than the grace period meets
    one, closed together once the run delivered everything, reverted if it did not.

    Called by the delivery workers (route, acknowledged) and at the end of the run
    (settle). Their number grows with customers x 31-day slots, never with events.
    """

    def __init__(self, orb: OrbDestination, replace: bool):
        self.orb = orb
        self.replace = replace
        self._lock = threading.Lock()
        # (field, customer, slot) -> the slot's backfills, in timeframe order
        self._slots: dict[tuple[str, str, int], list[_Backfill]] = {}
        self._by_id: dict[str, _Backfill] = {}
        self._run_key = uuid.uuid4().hex  # idempotency keys of this run's create requests
        self.settled: str | None = None  # "closed" or "reverted"

    def route(self, bodies: Sequence[bytes]) -> list[tuple[str | None, list[int]]] | None:
        """Events in the grace period go live (None); older ones to their backfill."""
        groups: dict[str | None, list[int]] = {}
        late = False
        # older than the grace period's start, to the second (canonical UTC text compares
        # as time): such an event falls before the end of a backfill created from now on
        boundary = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - self.orb.grace_hours * 3600))
        for position, body in enumerate(bodies):
            event = _routing_decoder.decode(body)
            channel = None
            if event.timestamp < boundary:
                channel = self._backfill_for(event).id
                late = True
            groups.setdefault(channel, []).append(position)
        return list(groups.items()) if late else None

    def _backfill_for(self, event: _Routing) -> _Backfill:
        if event.customer_id is not None:
            customer = ("customer_id", event.customer_id)
        else:
            customer = ("external_customer_id", str(event.external_customer_id))
        moment = dt.datetime.fromisoformat(event.timestamp.replace("Z", "+00:00"))
        slot = (moment - _EPOCH).days // BACKFILL_DAYS
        with self._lock:
            if self.settled is not None:
                raise DeliveryError(f"Orb backfills were already {self.settled}: no event can join them now")
            found = self._slots.setdefault((*customer, slot), [])
            for backfill in found:
                if backfill.start <= moment < backfill.end:
                    return backfill
            # The slot's next timeframe starts where its last one ended, and ends at the
            # grace boundary (Orb takes no backfill reaching into the grace period) or the
            # slot's end. The event is older than that boundary, so it falls inside.
            slot_start = _EPOCH + dt.timedelta(days=slot * BACKFILL_DAYS)
            start = found[-1].end if found else slot_start
            boundary = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=self.orb.grace_hours)
            end = min(slot_start + dt.timedelta(days=BACKFILL_DAYS), boundary.replace(microsecond=0))
            backfill = self._create(customer, start, end)
            found.append(backfill)
            self._by_id[backfill.id] = backfill
            return backfill

    def _create(self, customer: tuple[str, str], start: dt.datetime, end: dt.datetime) -> _Backfill:
        body = {
            "timeframe_start": iso(start),
            "timeframe_end": iso(end),
            customer[0]: customer[1],
            "replace_existing_events": self.replace,
        }
        # the same key on a retry: a create whose answer was lost is not made twice
        key = f"{self._run_key}-{customer[0]}-{customer[1]}-{iso(start)}"
        document = self._call("POST", BACKFILL_PATH, body, idempotency_key=key)
        backfill = _Backfill(str(document["id"]), customer, start, end)
        logger.info(
            "Orb backfill %s created%s",
            backfill.describe(),
            " (replace_existing_events)" if self.replace else "",
        )
        return backfill

    def acknowledged(self, backfill_id: str, count: int) -> None:
        with self._lock:
            self._by_id[backfill_id].events += count

    def settle(self, succeeded: bool) -> None:
        """Close every backfill (the run delivered everything), or revert them all: a
        close that fails reverts the ones closed before it too, so that the run's history
        lands whole or not at all (a STATE covers it only in the first case)."""
        with self._lock:
            if self.settled is not None or not self._by_id:
                return
            backfills = list(self._by_id.values())
            self.settled = "closed" if succeeded else "reverted"
        if succeeded:
            try:
                for backfill in backfills:
                    self._call("POST", f"{BACKFILL_PATH}/{backfill.id}/close", None)
                    backfill.closed = True
                    logger.info("Orb backfill %s closed: %d events", backfill.describe(), backfill.events)
                return
            except UsageBillingError as exc:
                self.settled = "reverted"
                self._revert_all(backfills)
                raise DeliveryError(
                    f"closing an Orb backfill failed, so the run's backfills were reverted: {exc}"
                ) from None
        self._revert_all(backfills)

    def _revert_all(self, backfills: list[_Backfill]) -> None:
        left = []
        for backfill in backfills:
            try:
                self._call("POST", f"{BACKFILL_PATH}/{backfill.id}/revert", None)
                logger.warning(
                    "Orb backfill %s reverted (%d events): the run did not deliver everything; "
                    "re-run from the last STATE",
                    backfill.describe(),
                    backfill.events,
                )
            except UsageBillingError as exc:
                left.append(backfill.id)
                logger.error("Orb backfill %s could not be reverted: %s", backfill.describe(), exc)
        if left:
            logger.error(
                "Revert Orb backfills %s yourself (POST /v1/events/backfills/ID/revert): Orb closes "
                "a pending backfill by itself a day after it was created",
                ", ".join(left),
            )

    def summary(self) -> list[str]:
        with self._lock:
            backfills = list(self._by_id.values())
        if not backfills:
            return []
        events = sum(b.events for b in backfills)
        return [f"  Orb backfills: {len(backfills)} {self.settled or 'open'}, {events} events in them"]

    def _call(
        self, method: str, path: str, body: t.Any, idempotency_key: str | None = None
    ) -> dict[str, t.Any]:
        orb = self.orb
        headers = orb._headers()
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        data = None if body is None else json.dumps(body).encode()

        def read(response: t.Any) -> dict[str, t.Any]:
            document = json_document(response)
            return document if isinstance(document, dict) else {}

        url = f"{orb.api_url}{path}"
        return orb.credential_request(
            method, url, headers, data, setting=orb.key_setting, credential="API key", path=path, read=read
        )
