"""The re-send horizon: ids the journal shows were acknowledged longer ago than the
platform de-duplicates them (Stripe 24 hours, Metronome 34 days, m3ter 35 days).

A resume or replay re-sends usage with the same ids, which is harmless only within the
platform's de-duplication window: after it, the platform bills the usage again. The
journal is bounded, so what it can show is bounded too:

- the ids of each stream's last committed batch (its *tail*: what a resumed run re-sends
  past its STATE), with the time they were committed: every such id is checked;
- the sampled ids (the first of every customer, meter and hour in each run, then
  ``journal_sample_rate`` of the rest, at most 100 a bucket), with the time each was
  committed: a replay of a whole hour meets its first id; a replay of part of one is seen
  with the probability that one of its ids was sampled.

Ids neither in a tail nor sampled are not recognised. Checks are made per batch, before
it is sent (no cost per record): one set lookup per customer, meter and day of the batch,
and a pass over the batch's ids only when the journal holds ids of that stream and day
committed before the horizon (or an old tail). Times are the journal's commit times, at
most a STATE interval after the acknowledgement.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from target_usage_billing.errors import ResendBeyondWindowError
from target_usage_billing.journal import Journal, Tally
from target_usage_billing.stats import StreamStats

logger = logging.getLogger("target-usage-billing")

# Old sampled ids held in memory at most (a replay over many old days stops loading more).
MAX_OLD_SAMPLES = 200_000


@dataclass(frozen=True)
class Resend:
    """Ids of a batch the platform acknowledged before its de-duplication window."""

    stream: str
    tail: set[str]  # in the stream's last committed batch: each one known
    sampled: list[str]  # the others, found among the sampled ids (the first few)
    count: int  # sampled hits
    first_sent_at: str  # the earliest commit time among them
    window: dt.timedelta

    def describe(self, platform: str) -> str:
        ids = self.sampled or sorted(self.tail)
        count = self.count or len(self.tail)
        shown = ", ".join(repr(i) for i in ids[:3]) + (", ..." if count > 3 else "")
        return (
            f"stream {self.stream!r}: {count} id(s) of this batch ({shown}) "
            f"were acknowledged by {platform} at {self.first_sent_at} (the run journal), longer ago than "
            f"{platform} de-duplicates ids ({span(self.window)}): sent again, they would be billed twice"
        )


class ResendHorizon:
    """Checks each batch before it is sent (the reading thread calls it at hand-over)."""

    def __init__(self, journal: Journal, window: dt.timedelta):
        self.journal = journal
        self.window = window
        self._tail_at: dict[str, str | None] = {}
        self._old: dict[tuple[str, str], dict[str, str]] = {}  # (stream, day) -> id -> sent_at
        self._loaded = 0
        self.refused: ResendBeyondWindowError | None = None

    def screen(self, stream: str, tally: Tally, counts: StreamStats, platform: str, force: bool) -> set[str]:
        """The ids of a batch not to send again. Those of the stream's last batch in the
        journal are known one by one: they are left out. Others, found among the sampled
        ids, mean a replay of usage billed before: the run stops before the batch is sent.
        ``force`` (allow_resend_beyond_dedup_window): all are sent, with a warning."""
        found = self.check(stream, tally)
        if found is None:
            return set()
        message = found.describe(platform)
        if force:
            if not counts.resent_beyond_window:
                logger.warning("%s; sending anyway (allow_resend_beyond_dedup_window)", message)
            counts.resent_beyond_window += len(found.tail) + found.count
            return set()
        if found.sampled:
            self.refused = ResendBeyondWindowError(
                f"{message}. Nothing of this batch was sent and no STATE covers it: start the tap "
                "after the usage already billed, or set allow_resend_beyond_dedup_window to send "
                "it again anyway"
            )
            raise self.refused
        if not counts.skipped_beyond_window:
            logger.warning(
                "%s; they are not sent again (the journal holds each of them: the last batch of an "
                "earlier run)",
                message,
            )
        counts.skipped_beyond_window += len(found.tail)
        return found.tail

    def check(self, stream: str, tally: Tally) -> Resend | None:
        now = dt.datetime.now(dt.timezone.utc)
        horizon = (now - self.window).strftime("%Y-%m-%dT%H:%M:%SZ")
        # a day's usage was first sent at most a day before it began (times ahead): only
        # days starting before horizon + 1 day can hold ids sent before the horizon
        last_day = (now - self.window + dt.timedelta(days=1)).strftime("%Y-%m-%d")
        tail: set[str] = set()
        times: list[str] = []
        tail_at = self._tail_time(stream)
        if tail_at is not None and tail_at < horizon:
            known = self.journal.known_tail(stream)
            if known and not known.isdisjoint(tally.ids):
                tail = known.intersection(tally.ids)
                times.append(tail_at)
        old: dict[str, str] = {}
        for day in {hour[:10] for hour in tally.hours()}:
            if day <= last_day:
                old.update(self._old_samples(stream, day, horizon))
        sampled = [i for i in tally.ids if i in old and i not in tail] if old else []
        if not tail and not sampled:
            return None
        times += [old[i] for i in sampled]
        return Resend(stream, tail, sampled[:10], len(sampled), min(times), self.window)

    def _tail_time(self, stream: str) -> str | None:
        if stream not in self._tail_at:
            journal = self.journal
            self._tail_at[stream] = journal.store.tail_sent_at(journal.scope, stream)
        return self._tail_at[stream]

    def _old_samples(self, stream: str, day: str, horizon: str) -> dict[str, str]:
        key = (stream, day)
        found = self._old.get(key)
        if found is None:
            room = max(0, MAX_OLD_SAMPLES - self._loaded)
            journal = self.journal
            found = (
                journal.store.samples_sent_before(journal.scope, stream, day, horizon, room) if room else {}
            )
            self._loaded += len(found)
            self._old[key] = found
        return found


def span(window: dt.timedelta) -> str:
    hours = window.total_seconds() / 3600
    return f"{hours:g} hours" if hours < 48 else f"{hours / 24:g} days"


def checker(journal: Journal | None, window: dt.timedelta | None) -> ResendHorizon | None:
    """The horizon check of a run (None: no journal, or a platform without a window)."""
    if journal is None or window is None:
        return None
    return ResendHorizon(journal, window)
