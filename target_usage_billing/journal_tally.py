"""What one batch adds to the run journal, counted from the payloads the sink already holds.

The sink calls ``Tally.add`` once per item, so that is the journal's cost on the hot path:
a function generated per payload layout (``JournalFields``), with the paths inlined, that
keeps the id and adds the item's numbers to its customer, meter and hour (exactly: ints
as ints, decimals in a 200-digit context). Everything else is done once per batch when
it is acknowledged (``Tally.settle``): the bucket keys made canonical, the first id of
each bucket and a random sample (drawn by gaps, so its cost follows the sample). Measured
with ``benchmarks/run.py --journal-cost``; see the README.
"""

from __future__ import annotations

import collections
import decimal
import hashlib
import math
import random
import time
import typing as t
from dataclasses import dataclass

import msgspec

from target_usage_billing.journal_store import EXACT, BucketKey
from target_usage_billing.mapping.coerce import MAX_NUMBER_DIGITS

SAMPLE_SIZE = 100  # at most this many ids kept per bucket
SAMPLE_RATE = 0.01  # beyond the first id of each bucket, about one id in a hundred
BUCKETS_REMEMBERED = 100_000  # bucket keys made once and kept (all streams together)

_Decimal = decimal.Decimal
_NUMERIC_FIRST = frozenset("0123456789-.")  # what numeric text (as_number) can start with
_InvalidOperation = decimal.InvalidOperation
_body_decoder = msgspec.json.Decoder(float_hook=decimal.Decimal)  # exact numbers


@dataclass(frozen=True)
class JournalFields:
    """Where a platform's payload keeps what the journal aggregates (declared by each
    destination): dotted paths, the first present one wins for ``customer``."""

    id: str
    customer: tuple[str, ...]
    meter: str
    time: str
    # objects whose numeric values are summed: (path, keys to sum or None for every key
    # holding a number or a number as text)
    values: tuple[tuple[str, tuple[str, ...] | None], ...] = ()


def digest(body: bytes) -> str:
    """A body's digest as the journal keeps it (stable across runs and machines)."""
    return hashlib.blake2b(body, digest_size=8).hexdigest()


def hour_of(value: t.Any) -> str:
    """The UTC hour ("YYYY-MM-DDTHH") of a payload time: canonical UTC text, a date, or
    Unix seconds (Lago); "unknown" for anything else."""
    if isinstance(value, str):
        if value[10:11] == "T":
            return value[:13]
        if value[:4].isdigit() and len(value) >= 10 and value[4] == "-":
            rest = value[10:].strip()
            return f"{value[:10]}T{rest[:2]}" if rest[:2].isdigit() else f"{value[:10]}T00"
        try:
            value = _Decimal(value)
        except decimal.InvalidOperation:
            return "unknown"
    if isinstance(value, (int, _Decimal)) and not isinstance(value, bool):
        try:
            return time.strftime("%Y-%m-%dT%H", time.gmtime(int(value)))
        except (OverflowError, ValueError, OSError):
            return "unknown"
    return "unknown"


def as_number(value: t.Any) -> int | decimal.Decimal | None:
    """A payload value as an exact number, when it is one (a JSON number or numeric text)
    that the mapping would take as a number: a decimal finite, under MAX_NUMBER_DIGITS
    digits written out (text like "1e9999999" is text to the journal: no sum could hold
    it); an integer as it is (the reader takes JSON integers of up to 4,300 digits)."""
    if type(value) is int:
        return value
    if type(value) is _Decimal:
        return value if _sane(value) else None
    if type(value) is str and value and (value[0].isdigit() or value[0] in "-."):
        if len(value) < 19 and value.isascii() and value.isdigit():  # a whole number: no Decimal
            return int(value)
        try:
            number = _Decimal(value)
        except decimal.InvalidOperation:
            return None
        return number if _sane(number) else None
    return None


def _sane(number: decimal.Decimal) -> bool:
    return number.is_finite() and -MAX_NUMBER_DIGITS < number.adjusted() < MAX_NUMBER_DIGITS


def _text(value: t.Any) -> str:
    return value if type(value) is str else ("" if value is None else str(value))


def _read(path: str, name: str) -> str:
    """Python source reading dotted ``path`` from ``payload`` (``name``: a temporary)."""
    head, *rest = path.split(".")
    source = f"payload.get({head!r})"
    for part in rest:
        source = f"({name}.get({part!r}) if ({name} := {source}).__class__ is dict else None)"
    return source


def _reader(path: str) -> t.Callable[[dict], t.Any]:
    namespace: dict[str, t.Any] = {}
    exec(f"def read(payload):\n    return {_read(path, '_v')}\n", namespace)  # our own paths, not input
    return t.cast(t.Callable[[dict], t.Any], namespace["read"])


class Layout:
    """One payload layout compiled: the generated per-item ``add`` and the readers the
    per-batch work needs."""

    def __init__(self, fields: JournalFields):
        self.fields = fields
        self.read_id = _reader(fields.id)
        customers = [_reader(path) for path in fields.customer]
        self.read_customer = (
            customers[0]
            if len(customers) == 1
            else (
                lambda payload: next(
                    (c for c in (read(payload) for read in customers) if c is not None), None
                )
            )
        )
        self.read_meter = _reader(fields.meter)
        self.read_time = _reader(fields.time)
        self._buckets: dict[str, dict[tuple, BucketKey]] = {}
        self._remembered = 0  # bucket keys in _buckets, over all streams
        # per value path: the journal's field name of each key summed ("" is the path itself)
        self.field_names: list[dict[str, str]] = [
            {"": path, **{name: f"{path}.{name}" for name in names or ()}} for path, names in fields.values
        ]
        customer = _read(fields.customer[0], "_c0")
        for number, path in enumerate(fields.customer[1:], 1):
            customer = f"(_k if (_k := {customer}) is not None else {_read(path, f'_c{number}')})"
        empties = ", {}, {}" * len(fields.values)  # per value path: whole-number and decimal totals
        source = (
            "def make(ids, entries, add_number, exact_add, Decimal, numeric_first, InvalidOperation):\n"
            "    ids_append = ids.append\n"
            "    get = entries.get\n"
            "    def add(payload, body):\n"
            f"        ids_append({_read(fields.id, '_i')})\n"
            f"        _t = {_read(fields.time, '_t0')}\n"
            # canonical UTC text and Unix seconds (Lago) are filed under their hour at once, so
            # a batch has a tally entry per hour, not per second; anything else at settling
            "        if _t.__class__ is str:\n"
            "            if _t[10:11] == 'T':\n"
            "                _t = _t[:13]\n"
            "            else:\n"
            "                _s, _p, _f = _t.partition('.')\n"
            "                if _s.isdigit() and (_s + _f).isascii() and (not _p or _f.isdigit()):\n"
            "                    _t = int(_s)\n"
            "                    _t -= _t % 3600\n"
            "        elif _t.__class__ is int:\n"
            "            _t -= _t % 3600\n"
            f"        key = ({customer}, {_read(fields.meter, '_m')}, _t)\n"
            "        entry = get(key)\n"
            "        if entry is None:  # [count, position of its first item, totals per value path]\n"
            f"            entry = entries[key] = [0, len(ids) - 1{empties}]\n"
            "        entry[0] += 1\n"
        )
        for number, (path, names) in enumerate(fields.values):
            chosen = f"((n, found[n]) for n in {tuple(names or ())!r} if n in found)"
            pairs = "found.items()" if names is None else chosen
            source += (
                f"        found = {_read(path, f'_w{number}')}\n"
                "        if found is not None:\n"
                f"            whole, decimals = entry[{2 + 2 * number}], entry[{3 + 2 * number}]\n"
                "            if found.__class__ is dict:\n"
                f"                for name, value in {pairs}:\n"
                "                    kind = value.__class__\n"
                "                    if kind is int:\n"
                "                        whole[name] = whole.get(name, 0) + value\n"
                "                    elif kind is Decimal:  # exactly, whatever this thread's context\n"
                "                        if value.is_finite() and "
                f"-{MAX_NUMBER_DIGITS} < value.adjusted() < {MAX_NUMBER_DIGITS}:  # as_number\n"
                "                            decimals[name] = exact_add(decimals.get(name, 0), value)\n"
                "                    elif kind is str:  # numeric text (as_number), the common forms inline\n"
                "                        if value.isdigit() and len(value) < 19 and value.isascii():\n"
                "                            whole[name] = whole.get(name, 0) + int(value)\n"
                "                        elif value[:1] in numeric_first or value[:1].isdigit():\n"
                "                            try:\n"
                "                                number = Decimal(value)\n"
                "                            except InvalidOperation:\n"
                "                                continue\n"
                "                            if number.is_finite() and "
                f"-{MAX_NUMBER_DIGITS} < number.adjusted() < {MAX_NUMBER_DIGITS}:\n"
                "                                decimals[name] = exact_add(decimals.get(name, 0), number)\n"
                "            else:  # the path holds a number itself\n"
                "                add_number(whole, decimals, '', found)\n"
            )
        source += "    return add\n"
        namespace: dict[str, t.Any] = {}
        exec(compile(source, "<journal tally>", "exec"), namespace)  # from our own paths, not input
        self.make = namespace["make"]

    def field_name(self, number: int, name: str) -> str:
        """The journal's name of key ``name`` of value path ``number`` (made once)."""
        field = self.field_names[number][name] = f"{self.fields.values[number][0]}.{name}"
        return field

    def buckets(self, stream: str) -> dict[tuple, BucketKey]:
        """Bucket keys already made for ``stream``, by the tuple ``add`` files under."""
        found = self._buckets.get(stream)
        if found is None:
            found = self._buckets[stream] = {}
        return found

    def remember(self, buckets: dict[tuple, BucketKey], raw: tuple, key: BucketKey) -> BucketKey:
        if self._remembered >= BUCKETS_REMEMBERED:  # bounded on runs of any length and breadth
            for each in self._buckets.values():
                each.clear()
            self._remembered = 0
        buckets[raw] = key
        self._remembered += 1
        return key

    @property
    def remembered(self) -> int:
        """Bucket keys kept, over all streams."""
        return sum(map(len, self._buckets.values()))

    def bucket(self, stream: str, customer: t.Any, meter: t.Any, moment: t.Any) -> BucketKey:
        filed = type(moment) is str and len(moment) == 13 and moment[10:11] == "T"  # by add
        hour = moment if filed else hour_of(moment)
        return (stream, _text(customer), _text(meter) if meter else "", hour)

    def bucket_of(self, stream: str, payload: dict) -> BucketKey:
        moment = self.read_time(payload)
        if type(moment) is str and moment[10:11] == "T":
            moment = moment[:13]
        return self.bucket(stream, self.read_customer(payload), self.read_meter(payload), moment)


class Tally:
    """One batch's items counted and summed per customer, meter and time as filed
    (``add``), then put under their buckets and sampled (``settle``): ``settled`` holds
    (bucket, [count, position of its first item, totals per value path]) for the journal
    to add up (a bucket may come twice: times filed apart, one hour)."""

    __slots__ = ("_entries", "_layout", "add", "ids", "samples", "settled", "stream")

    def __init__(self, layout: Layout, stream: str):
        self._layout = layout
        self.stream = stream
        self.ids: list[t.Any] = []
        # (customer, meter, time as filed) -> [count, position of the first, totals per value path]
        self._entries: dict[tuple, list] = {}
        # add(payload, body): count one item (generated, see Layout)
        self.add: t.Callable[[dict, bytes], None] = layout.make(
            self.ids,
            self._entries,
            _add_number,
            EXACT.add,
            _Decimal,
            _NUMERIC_FIRST,
            _InvalidOperation,
        )
        self.settled: list[tuple[BucketKey, list]] = []
        self.samples: dict[BucketKey, list[tuple[str, str]]] = {}

    def settle(
        self, bodies: t.Sequence[bytes], first_sampled: set[BucketKey], sample_rate: float, rng: random.Random
    ) -> None:
        """Put what was filed under its buckets and sample it; ``bodies[i]`` is item i's
        body. Every bucket's first id of the run (not in ``first_sampled``, which it
        updates) is kept, then about ``sample_rate`` of the others."""
        layout, stream = self._layout, self.stream
        ids = self.ids
        if not {str}.issuperset(map(type, ids)):
            ids[:] = map(_text, ids)
        buckets = layout.buckets(stream)
        settled = self.settled
        for raw, entry in self._entries.items():
            key = buckets.get(raw)
            if key is None:
                key = layout.remember(buckets, raw, layout.bucket(stream, *raw))
            settled.append((key, entry))
            if key not in first_sampled:
                first_sampled.add(key)
                self.samples.setdefault(key, []).append((ids[entry[1]], digest(bodies[entry[1]])))
        self._pick(bodies, sample_rate, rng)
        self._entries = {}

    def add_into(self, buckets: dict[BucketKey, list]) -> None:
        """Add the settled counts and exact sums into ``buckets``: per bucket, [items,
        {field: total}]."""
        layout = self._layout
        with decimal.localcontext(EXACT):  # exact sums, whatever the thread's context
            for key, entry in self.settled:
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = [0, {}]
                bucket[0] += entry[0]
                totals = bucket[1]
                for number, fields in enumerate(layout.field_names):
                    for part in (entry[2 + 2 * number], entry[3 + 2 * number]):
                        for name, total in part.items():
                            field = fields.get(name) or layout.field_name(number, name)
                            totals[field] = totals.get(field, 0) + total

    @property
    def counts(self) -> collections.Counter[BucketKey]:
        """Items per bucket (the settled tally)."""
        counts: collections.Counter[BucketKey] = collections.Counter()
        for key, entry in self.settled:
            counts[key] += entry[0]
        return counts

    @property
    def sums(self) -> dict[BucketKey, dict[str, t.Any]]:
        """Exact totals per bucket and field (the settled tally)."""
        buckets: dict[BucketKey, list] = {}
        self.add_into(buckets)
        return {key: totals for key, (_items, totals) in buckets.items()}

    def hours(self) -> set[str]:
        """The UTC hours of the settled buckets."""
        return {key[3] for key, _entry in self.settled}

    def _pick(self, bodies: t.Sequence[bytes], rate: float, rng: random.Random) -> None:
        """Sample each item with probability ``rate`` (gaps drawn geometrically, so the cost
        follows the sample, not the batch)."""
        if rate <= 0 or not bodies:
            return
        log_keep = math.log1p(-rate) if rate < 1 else None
        position = -1
        while True:
            position += 1 if log_keep is None else 1 + int(math.log(1.0 - rng.random()) / log_keep)
            if position >= len(bodies):
                return
            body = bodies[position]
            key = self._layout.bucket_of(self.stream, _body_decoder.decode(body))
            sample = self.samples.setdefault(key, [])
            entry = (self.ids[position], digest(body))
            if len(sample) < SAMPLE_SIZE and entry not in sample:
                sample.append(entry)


def _add_number(whole: dict[str, int], decimals: dict[str, t.Any], name: str, value: t.Any) -> None:
    """Add a value that is not a JSON number (numeric text) when it is a number."""
    number = as_number(value)
    if type(number) is int:
        whole[name] = whole.get(name, 0) + number
    elif number is not None:
        decimals[name] = EXACT.add(decimals.get(name, 0), number)


class Bodies(t.Sequence[bytes]):
    """The bodies of a batch's items (tuples whose first element is the body), read only
    where the journal samples one."""

    __slots__ = ("_items",)

    def __init__(self, items: t.Sequence[tuple]):
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    @t.overload
    def __getitem__(self, index: int) -> bytes: ...
    @t.overload
    def __getitem__(self, index: slice) -> list[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [item[0] for item in self._items[index]]
        return t.cast(bytes, self._items[index][0])
