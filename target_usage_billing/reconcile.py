"""``--reconcile``: read back what the platform kept and compare it with the run journal.

For the days asked (``--since``/``--until``, the last 7 by default) it takes the
journal's buckets for the configured platform account and asks the platform, with the
read APIs its official SDK exposes (see each destination's read side):
- by id (Metronome, Orb, Lago, OpenMeter): every sampled id, found, missing or invalid;
- by totals (m3ter, Stripe): the exact sums per customer, meter and day;
and, where the platform validates after acknowledging, the items it reported invalid.

It prints a table per customer, meter and day, lists what is missing or invalid, writes
each invalid item to the dead-letter file (stage ``platform``), and exits 0 when
everything checked is confirmed, 8 when anything is missing or invalid.
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import logging
import typing as t

from target_usage_billing.deadletter import DeadLetters
from target_usage_billing.destinations import DESTINATIONS, Destination
from target_usage_billing.destinations.readback import ItemCheck, TotalKey, Window
from target_usage_billing.errors import ConfigError, JournalError, ReconcileMismatch
from target_usage_billing.http import HttpTransport
from target_usage_billing.journal_store import BucketRow, SampleRow, open_store
from target_usage_billing.settings import Settings

logger = logging.getLogger("target-usage-billing.reconcile")
DEFAULT_DAYS = 7
SHOWN = 20  # missing or invalid ids listed one by one


def window_for(since: str | None, until: str | None, now: dt.datetime | None = None) -> Window:
    """The UTC days from ``since`` to ``until`` (ISO 8601 dates or times), both included."""
    now = now or dt.datetime.now(dt.timezone.utc)

    def day(text: str, option: str) -> str:
        try:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{option}: {text!r} is not an ISO 8601 date or time") from None
        if moment.tzinfo is not None:
            moment = moment.astimezone(dt.timezone.utc)
        return moment.strftime("%Y-%m-%d")

    first = (
        day(since, "--since") if since else (now - dt.timedelta(days=DEFAULT_DAYS - 1)).strftime("%Y-%m-%d")
    )
    last = day(until, "--until") if until else now.strftime("%Y-%m-%d")
    if first > last:
        raise ConfigError(f"--since {first} is after --until {last}")
    return Window(first, last)


class Reconciliation:
    """One platform account, one window: what the journal says against what the platform says."""

    def __init__(self, destination: Destination, buckets: list[BucketRow], samples: list[SampleRow]):
        self.destination = destination
        self.hourly = buckets  # the journal keeps hours; the table and totals are per day
        self.buckets = [(stream, c, m, hour[:10], items, sums) for stream, c, m, hour, items, sums in buckets]
        self.samples = [(i, stream, c, m, hour[:10], d) for i, stream, c, m, hour, d in samples]
        self.checks: dict[str, ItemCheck] = {}
        self.unchecked: dict[str, str] = {}  # id -> why it could not be checked
        self.totals: dict[TotalKey, decimal.Decimal] = {}
        self.invalid: dict[str, str] = {}  # id -> the platform's reason
        self.volume: dict[str, int] | None = None  # events the platform holds per hour (Orb)

    def run(self, window: Window) -> None:
        destination = self.destination
        if destination.read_back == "ids":
            self._check_ids(window)
        else:
            wanted = {
                (customer, meter, day, name)
                for _stream, customer, meter, day, _items, sums in self.buckets
                for name in [*sums, "items"]
            }
            self.totals = destination.platform_totals(wanted, window)
        self.invalid = destination.invalid_items(window)
        self.volume = destination.hourly_volume(window)

    def _check_ids(self, window: Window) -> None:
        destination = self.destination
        oldest = None
        if destination.read_days is not None:
            oldest = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=destination.read_days)).strftime(
                "%Y-%m-%d"
            )
        ids = []
        for item_id, _stream, _customer, _meter, day, _digest in self.samples:
            if oldest is not None and day <= oldest:
                self.unchecked[item_id] = (
                    f"older than {destination.label}'s {destination.read_days}-day search"
                )
            else:
                ids.append(item_id)
        for start in range(0, len(ids), destination.read_batch):
            chunk = ids[start : start + destination.read_batch]
            self.checks.update(destination.check_items(chunk, window))
        for item_id in ids:
            self.checks.setdefault(item_id, ItemCheck(False))

    # --- verdicts -------------------------------------------------------------------

    @property
    def missing_ids(self) -> list[str]:
        return [item_id for item_id, check in self.checks.items() if not check.found]

    @property
    def invalid_ids(self) -> dict[str, str]:
        found = {i: c.problem for i, c in self.checks.items() if c.found and c.problem}
        return {**found, **self.invalid}

    def total_differences(self) -> list[tuple[TotalKey, decimal.Decimal, decimal.Decimal | None]]:
        """(key, journal, platform) where they differ (platform None: it has none); only
        for platforms read back by totals."""
        if self.destination.read_back != "totals":
            return []
        out = []
        for key, sent in self._journal_totals().items():
            held = self.totals.get(key)
            if held is None and key[3] == "items":
                continue  # the platform gives sums only
            if held != sent:
                out.append((key, sent, held))
        return out

    def _journal_totals(self) -> dict[TotalKey, decimal.Decimal]:
        totals: dict[TotalKey, decimal.Decimal] = {}
        zero = decimal.Decimal(0)
        for _stream, customer, meter, day, items, sums in self.buckets:
            count_key = (customer, meter, day, "items")
            totals[count_key] = totals.get(count_key, zero) + items
            for name, value in sums.items():
                sum_key = (customer, meter, day, name)
                totals[sum_key] = totals.get(sum_key, zero) + value
        return totals

    def _journal_hours(self) -> dict[str, int]:
        hours: dict[str, int] = collections.Counter()
        for _stream, _customer, _meter, hour, items, _sums in self.hourly:
            hours[hour] += items
        return hours

    def volume_shortfalls(self) -> list[tuple[str, int, int]]:
        """(hour, journal, platform) where the platform holds fewer events than the journal
        says were acknowledged for that hour. More is no mismatch: other senders share the
        account."""
        if self.volume is None:
            return []
        sent = self._journal_hours()
        return [
            (hour, count, self.volume.get(hour, 0))
            for hour, count in sorted(sent.items())
            if self.volume.get(hour, 0) < count
        ]

    @property
    def confirmed(self) -> bool:
        return (
            not self.missing_ids
            and not self.invalid_ids
            and not self.total_differences()
            and not self.volume_shortfalls()
        )

    # --- what the operator reads ------------------------------------------------------

    def report_lines(self, window: Window, where: str) -> list[str]:
        destination = self.destination
        lines = [
            f"Reconcile {destination.label} ({destination.journal_scope()}), "
            f"{window.first} to {window.last}, journal {where}"
        ]
        if not self.buckets:
            lines.append("  the journal holds nothing for this account and these days: nothing to check")
            return lines
        per_bucket = self._per_bucket()
        if destination.read_back == "ids":
            lines.append(
                f"  {'customer':<24} {'meter':<20} {'day':<10} {'sent':>9} {'checked':>8} "
                f"{'found':>7} {'missing':>8} {'invalid':>8}"
            )
            for (customer, meter, day), counts in sorted(per_bucket.items()):
                sent, checked, found, lost, bad = counts
                lines.append(
                    f"  {customer[:24]:<24} {meter[:20]:<20} {day:<10} {sent:>9} {checked:>8} "
                    f"{found:>7} {lost:>8} {bad:>8}"
                )
            total = sum(row[0] for row in per_bucket.values())
            lines.append(
                f"  checked {len(self.checks):,} of {total:,} ids (a sample of each customer, meter "
                f"and day): {len(self.checks) - len(self.missing_ids):,} found, "
                f"{len(self.missing_ids):,} missing, {len(self.invalid_ids):,} invalid"
                + (
                    f"; {len(self.unchecked):,} not checked ({next(iter(self.unchecked.values()))})"
                    if self.unchecked
                    else ""
                )
            )
        else:
            lines.append(
                f"  {'customer':<24} {'meter':<20} {'day':<10} {'field':<22} {'sent':>16} "
                f"{'platform':>16} {'difference':>12}"
            )
            for (customer, meter, day, name), journal_total in sorted(self._journal_totals().items()):
                held = self.totals.get((customer, meter, day, name))
                if held is None and name == "items":
                    continue
                shown = "none" if held is None else _number(held)
                difference = _number((held or 0) - journal_total)
                lines.append(
                    f"  {customer[:24]:<24} {meter[:20]:<20} {day:<10} {name[:22]:<22} "
                    f"{_number(journal_total):>16} {shown:>16} {difference:>12}"
                )
        if self.volume is not None:
            lines.append(
                f"  {'day':<10} {'sent':>9} {'platform':>9}  (the account's every event, hour by hour)"
            )
            short: dict[str, list[str]] = collections.defaultdict(list)
            for hour, _sent, _held in self.volume_shortfalls():
                short[hour[:10]].append(hour[11:13])
            days: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
            for hour, count in self._journal_hours().items():
                days[hour[:10]][0] += count
                days[hour[:10]][1] += self.volume.get(hour, 0)
            for day, (count, platform_count) in sorted(days.items()):
                mark = f"  SHORT (hours {', '.join(sorted(short[day]))} UTC)" if day in short else ""
                lines.append(f"  {day:<10} {count:>9} {platform_count:>9}{mark}")
        missing = self.missing_ids
        if missing:
            more = " ..." if len(missing) > SHOWN else ""
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:SHOWN])}{more}")
        invalid = self.invalid_ids
        for item_id, reason in list(invalid.items())[:SHOWN]:
            lines.append(f"  invalid: {item_id}: {reason}")
        if len(invalid) > SHOWN:
            lines.append(f"  ... and {len(invalid) - SHOWN} more invalid (see the dead-letter file)")
        lines.append("  result: " + ("every item checked is confirmed" if self.confirmed else "MISMATCH"))
        return lines

    def _per_bucket(self) -> dict[tuple[str, str, str], list[int]]:
        rows: dict[tuple[str, str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0, 0])
        for _stream, customer, meter, day, items, _sums in self.buckets:
            rows[(customer, meter, day)][0] += items
        invalid = self.invalid_ids
        for item_id, _stream, customer, meter, day, _digest in self.samples:
            check = self.checks.get(item_id)
            if check is None:
                continue
            row = rows[(customer, meter, day)]
            row[1] += 1
            row[2] += check.found
            row[3] += not check.found
            row[4] += item_id in invalid
        return rows


def _number(value: decimal.Decimal | int) -> str:
    text = format(decimal.Decimal(value), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def reconcile(
    config: t.Mapping[str, t.Any],
    defaults: t.Mapping[str, t.Any],
    since: str | None,
    until: str | None,
    outcome: dict[str, t.Any] | None = None,
) -> list[str]:
    """Run a reconciliation; its report lines. ReconcileMismatch when anything is off.
    ``outcome`` receives the result's figures (for the run report)."""
    settings = Settings.from_config(config, defaults)
    destination_class = DESTINATIONS[settings.destination]
    problems = destination_class.config_errors(config, dry_run=False)
    if problems:
        raise ConfigError("; ".join(problems))
    window = window_for(since, until)
    transport = HttpTransport(
        timeout_seconds=settings.request_timeout_seconds, retry_budget_seconds=settings.max_retry_seconds
    )
    destination = destination_class(config, transport)
    try:
        store = open_store(settings.journal_url, settings.journal_path, settings.dead_letter_path)
    except JournalError as exc:
        raise ConfigError(str(exc)) from None
    try:
        scope = destination.journal_scope()
        buckets = store.buckets(scope, window.first, window.last)
        samples = store.samples(scope, window.first, window.last)
    finally:
        store.close()
    check = Reconciliation(destination, buckets, samples)
    try:
        if buckets:
            check.run(window)
    finally:
        transport.close_connections()
    lines = check.report_lines(window, store.where)
    invalid = check.invalid_ids
    if outcome is not None:
        outcome.update(
            platform=destination.name,
            account=destination.journal_scope(),
            since=window.first,
            until=window.last,
            journal=store.where,
            read_back=destination.read_back,
            buckets=len(buckets),
            checked=len(check.checks),
            missing=len(check.missing_ids),
            invalid=len(invalid),
            totals_differ=len(check.total_differences()),
            hours_short=len(check.volume_shortfalls()),
            confirmed=check.confirmed,
        )
    if invalid:
        _dead_letter(settings, destination, check, invalid)
    if not check.confirmed:
        differences = len(check.total_differences())
        short = check.volume_shortfalls()
        hours_short = f", {len(short)} hours short in its event volume" if short else ""
        raise ReconcileMismatch(
            f"{destination.label} does not hold everything the journal says it acknowledged "
            f"({len(check.missing_ids)} missing, {len(invalid)} invalid, {differences} totals differ"
            f"{hours_short}, {window.first} to {window.last})",
            lines,
        )
    return lines


def _dead_letter(
    settings: Settings, destination: Destination, check: Reconciliation, invalid: dict[str, str]
) -> None:
    where = {
        item_id: (stream, customer, meter, day) for item_id, stream, customer, meter, day, _d in check.samples
    }
    letters = DeadLetters(settings.dead_letter_path, destination.secrets(destination.config))
    try:
        for item_id, reason in invalid.items():
            stream, customer, meter, day = where.get(item_id, ("", "", "", ""))
            letters.write(
                stream=stream,
                record=None,
                stage="platform",
                reason=f"{destination.label} reported it invalid after acknowledging it: {reason}",
                id=item_id,
                customer=customer or None,
                meter=meter or None,
                day=day or None,
            )
    finally:
        letters.close()
