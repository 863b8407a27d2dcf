"""The journal's batch tally (generated code, column-free settling) against a plain
reference that counts every item one by one, on varied payloads of every layout."""

from __future__ import annotations

import collections
import decimal
import random
import tracemalloc

import pytest

from target_usage_billing import journal, journal_tally
from target_usage_billing.destinations.lago import LagoDestination as Lago
from target_usage_billing.destinations.m3ter import M3terDestination as M3ter
from target_usage_billing.destinations.metronome import MetronomeDestination as Metronome
from target_usage_billing.destinations.openmeter import OpenMeterDestination as OpenMeter
from target_usage_billing.destinations.orb import OrbDestination as Orb
from target_usage_billing.journal_store import EXACT, SqliteJournalStore
from target_usage_billing.journal_tally import JournalFields, Layout, Tally, as_number, digest, hour_of
from target_usage_billing.sinks import TALLY_ITEM_OVERHEAD

D = decimal.Decimal
STRIPE_LIKE = JournalFields(
    "identifier",
    ("payload.stripe_customer_id",),
    "event_name",
    "timestamp",
    (("payload", ("value", "tokens")),),
)
SCALAR = JournalFields("id", ("who",), "what", "when", (("amount", None),))
LAYOUTS = {
    "m3ter": M3ter.journal_fields,
    "metronome": Metronome.journal_fields,
    "orb": Orb.journal_fields,
    "lago": Lago.journal_fields,
    "openmeter": OpenMeter.journal_fields,
    "stripe-like": STRIPE_LIKE,
    "scalar": SCALAR,
}
ODD_VALUES = [
    1,
    0,
    -7,
    10**30,
    D("0.1"),
    D("1E-40"),
    D("-2.50"),
    "12",
    "3.25",
    "-1",
    "lots",
    "",
    True,
    False,
    1.5,
    None,
    {"nested": 1},
    [1, 2],
    "0012",
    "1e3",
    "NaN",
    "1e9999999",  # beyond any sum (as_number: text, not a number)
    "-1E-5000",
    D("1E+1200"),
]


def put(payload: dict, path: str, value: object) -> None:
    *heads, last = path.split(".")
    for head in heads:
        payload = payload.setdefault(head, {})
    payload[last] = value


def payloads(fields: JournalFields, count: int, rng: random.Random) -> list[dict]:
    made = []
    for number in range(count):
        payload: dict = {}
        put(payload, fields.id, f"id-{number}" if rng.random() < 0.95 else number)
        customer_path = rng.choice(fields.customer)
        if rng.random() < 0.97:
            put(payload, customer_path, rng.choice(["c1", "c2", "c3", 7, None]))
        put(payload, fields.meter, rng.choice(["m1", "m2", "", None, 3]))
        day = rng.randint(1, 3)
        moment = rng.choice(
            [
                f"2026-11-0{day}T10:00:00Z",
                f"2026-11-0{day}",
                1764000000 + day * 86400,
                f"{1764000000 + day}",
                D("1764000000.5"),
                "not a time",
                None,
                f"2026-11-0{day} 10:00",
            ]
        )
        put(payload, fields.time, moment)
        for path, names in fields.values:
            roll = rng.random()
            if roll < 0.1:
                continue
            if roll < 0.2 and names is None:
                put(payload, path, rng.choice(ODD_VALUES))  # the path holds a number, or not
                continue
            keys = names or rng.sample(["a", "b", "c", "d"], rng.randint(0, 4))
            put(payload, path, {k: rng.choice(ODD_VALUES) for k in keys if rng.random() < 0.9})
        made.append(payload)
    return made


def reference(fields: JournalFields, stream: str, items: list[dict]):
    """Every item counted on its own, as the journal's contract says."""

    def read(payload, path):
        value = payload
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    counts: collections.Counter = collections.Counter()
    sums: dict = collections.defaultdict(dict)
    for payload in items:
        customer = next((c for c in (read(payload, p) for p in fields.customer) if c is not None), None)
        meter = read(payload, fields.meter)
        moment = read(payload, fields.time)
        customer = "" if customer is None else str(customer)
        key = (stream, customer, str(meter) if meter else "", hour_of(moment))
        counts[key] += 1
        for path, names in fields.values:
            found = read(payload, path)
            if found is None:
                continue
            if not isinstance(found, dict):
                pairs = [(path, found)]
            else:
                pairs = [(f"{path}.{k}", v) for k, v in found.items() if names is None or k in names]
            for name, value in pairs:
                number = as_number(value)
                if number is not None:
                    with decimal.localcontext(EXACT):
                        sums[key][name] = sums[key].get(name, 0) + number
    return counts, sums


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_the_tally_counts_and_sums_exactly_what_the_reference_does(layout_name):
    fields = LAYOUTS[layout_name]
    rng = random.Random(layout_name)
    layout = Layout(fields)
    first_sampled: set = set()
    expected_counts: collections.Counter = collections.Counter()
    expected_sums: dict = collections.defaultdict(dict)
    got_counts: collections.Counter = collections.Counter()
    got_sums: dict = collections.defaultdict(dict)
    for _batch in range(8):
        items = payloads(fields, 300, rng)
        bodies = [repr(item).encode() for item in items]  # the sample reads bodies as JSON: see below
        counts, sums = reference(fields, "s", items)
        expected_counts.update(counts)
        for key, fields_sums in sums.items():
            for name, total in fields_sums.items():
                expected_sums[key][name] = expected_sums[key].get(name, 0) + total
        tally = Tally(layout, "s")
        for item in items:
            tally.add(item, b"{}")
        tally.settle([b"{}"] * len(bodies), first_sampled, 0.0, rng)
        got_counts.update(tally.counts)
        for key, fields_sums in tally.sums.items():
            for name, total in fields_sums.items():
                got_sums[key][name] = got_sums[key].get(name, 0) + total
        assert tally.ids == [str(item_id) for item_id in (layout.read_id(item) for item in items)]
    assert got_counts == expected_counts
    assert {k: v for k, v in got_sums.items() if v} == {k: v for k, v in expected_sums.items() if v}
    # every bucket had its first id sampled once over the run
    assert first_sampled == set(expected_counts)


def test_every_bucket_s_first_item_is_sampled_once_a_run_and_the_rest_at_the_rate():
    layout = Layout(M3ter.journal_fields)
    rng = random.Random(5)
    first_sampled: set = set()
    samples: dict = collections.defaultdict(list)
    total = 0
    for batch in range(20):
        tally = Tally(layout, "s")
        bodies = []
        for number in range(1000):
            item_id = f"b{batch}-{number}"
            body = (
                f'{{"uid":"{item_id}","account":"a{number % 3}","meter":"m","ts":"2026-11-01T00:00:00Z",'
                f'"measure":{{"n":1}}}}'
            ).encode()
            tally.add(
                {
                    "uid": item_id,
                    "account": f"a{number % 3}",
                    "meter": "m",
                    "ts": "2026-11-01T00:00:00Z",
                    "measure": {"n": 1},
                },
                body,
            )
            bodies.append(body)
        tally.settle(bodies, first_sampled, 0.01, rng)
        for key, sample in tally.samples.items():
            samples[key].extend(sample)
            for item_id, body_digest in sample:
                assert body_digest == digest(bodies[int(item_id.split("-")[1])])
        total += sum(len(s) for s in tally.samples.values())
    assert len(samples) == 3  # three customers, one meter, one hour
    firsts = {
        ("s", "a0", "m", "2026-11-01T00"): "b0-0",
        ("s", "a1", "m", "2026-11-01T00"): "b0-1",
        ("s", "a2", "m", "2026-11-01T00"): "b0-2",
    }
    for key, first in firsts.items():
        assert samples[key][0][0] == first
    # 3 firsts + about 1 % of 20,000 (200 expected; far outside 120..300 would be a broken draw)
    assert 120 < total - 3 < 300


def counted(fields: JournalFields, items: list[dict]) -> tuple[collections.Counter, dict]:
    """One batch of ``items`` through the tally: its counts and sums per bucket."""
    tally = Tally(Layout(fields), "s")
    for item in items:
        tally.add(item, b"{}")
    tally.settle([b"{}"] * len(items), set(), 0.0, random.Random(1))
    return tally.counts, {key: sums for key, sums in tally.sums.items() if sums}


NUMERIC_TEXT_ODDITIES = [
    "1_000",
    " 1",
    "1 ",
    "+1",
    "١٢",
    "-",
    "-inf",
    "Infinity",
    "NaN",
    "1e3",
    "0012",
    "",
    "x",
]


@pytest.mark.parametrize("oddity", NUMERIC_TEXT_ODDITIES)
def test_numeric_text_adds_up_as_the_reference_reads_it_one_value_at_a_time(oddity):
    fields = Metronome.journal_fields
    rng = random.Random(oddity)
    items = []
    for number in range(500):
        tokens = str(rng.randint(0, 5000)) if number != 250 else oddity
        properties = {"tokens": tokens, "cost": f"{rng.randint(0, 10**6) / 10**7:.7f}", "region": "eu-west-1"}
        if number % 7 == 0:
            del properties["cost"]
        items.append(
            {
                "transaction_id": f"t{number}",
                "customer_id": f"c{number % 5}",
                "event_type": "api",
                "timestamp": f"2026-11-01T{number % 3:02d}:00:00Z",
                "properties": properties,
            }
        )
    counts, sums = counted(fields, items)
    expected_counts, expected_sums = reference(fields, "s", items)
    assert counts == expected_counts
    assert sums == expected_sums
    assert len(expected_counts) == 15  # five customers, three hours


def test_unix_seconds_are_filed_under_their_utc_hour():
    fields = Lago.journal_fields
    items = [
        {
            "transaction_id": f"t{number}",
            "external_subscription_id": f"s{number % 4}",
            "code": "api",
            "timestamp": 1764000000 + number * 97,
            "properties": {"tokens": number, "seconds": D(number) / 8} if number % 5 else {},
        }
        for number in range(1000)
    ]
    counts, sums = counted(fields, items)
    expected_counts, expected_sums = reference(fields, "s", items)
    assert counts == expected_counts
    assert sums == expected_sums
    # 1764000000 is 2025-11-24T16:00:00Z; 97,000 seconds later is 26 hours on
    hours = {f"2025-11-{24 + (16 + h) // 24}T{(16 + h) % 24:02d}" for h in range(27)}
    assert {key[3] for key in counts} == hours


@pytest.mark.parametrize(
    "moment",
    [
        lambda n: f"{1764000000 + n * 97}.{n % 1000:03d}",  # Lago's text seconds with a fraction
        lambda n: str(1764000000 + n * 97),
        lambda n: 1764000000 + n * 97,
    ],
    ids=["text-with-fraction", "text", "int"],
)
def test_seconds_are_tallied_per_hour_not_per_second(moment):
    # each second its own tally entry made a batch of Lago's events one entry an item
    items = [
        {
            "transaction_id": f"t{n}",
            "external_subscription_id": f"s{n % 4}",
            "code": "api",
            "timestamp": moment(n),
        }
        for n in range(1000)
    ]
    tally = Tally(Layout(Lago.journal_fields), "s")
    for item in items:
        tally.add(item, b"{}")
    assert len(tally._entries) <= 4 * 27  # customers x hours
    counts, _sums = counted(Lago.journal_fields, items)
    assert counts == reference(Lago.journal_fields, "s", items)[0]
    assert len(counts) == 4 * 27


def test_other_times_are_filed_as_the_reference_reads_them():
    odd = ["-3601", "-1.5", "1.7e9", "2026-12-01", "2026-12-01 05:00:00", "20261201", "", "x", -3601, None]
    items = [
        {"transaction_id": f"t{n}", "external_subscription_id": "s", "code": "api", "timestamp": value}
        for n, value in enumerate(odd)
    ]
    assert counted(Lago.journal_fields, items)[0] == reference(Lago.journal_fields, "s", items)[0]


def test_bucket_keys_kept_are_bounded_over_all_streams_and_counts_stay_right(monkeypatch, tmp_path):
    # a run over many streams and customers keeps at most BUCKETS_REMEMBERED keys in all,
    # not that many per stream; forgetting one only means making it again
    monkeypatch.setattr(journal_tally, "BUCKETS_REMEMBERED", 50)
    monkeypatch.setattr(journal, "BUCKETS_REMEMBERED", 50)
    layout = Layout(M3ter.journal_fields)
    kept = journal.Journal(SqliteJournalStore(str(tmp_path / "j.sqlite")), "scope", M3ter.journal_fields)
    counts: collections.Counter = collections.Counter()
    for round_ in range(3):
        for stream in range(10):
            tally = Tally(layout, f"s{stream}")
            bodies = []
            for customer in range(20):
                payload = {"uid": f"{round_}-{stream}-{customer}", "account": f"a{customer}", "meter": "m"}
                payload.update(ts="2026-11-01T00:00:00Z", measure={"n": 1})
                tally.add(payload, b"{}")
                bodies.append(b"{}")
            kept.seal(tally, bodies)
            assert layout.remembered <= 50
            assert len(kept._first_sampled) <= 50
            counts.update(tally.counts)
    assert len(counts) == 200 and set(counts.values()) == {3}
    assert counts[("s9", "a19", "m", "2026-11-01T00")] == 3


def test_what_a_tally_holds_an_item_is_within_what_the_buffer_budget_counts():
    # the worst case: every item a customer of its own (a bucket each), several numbers
    layout = Layout(Metronome.journal_fields)
    tally = Tally(layout, "s")
    count = 2000
    tracemalloc.start()
    try:
        for number in range(count):
            payload = {
                "transaction_id": f"msg-{number:016x}-{number}",
                "customer_id": f"customer-{number:08d}",
                "event_type": "API Request",
                "timestamp": "2026-12-01T00:42:00.864Z",
                "properties": {"region": "us-east-1", "tokens": str(number), "cost_usd": f"0.{number:07d}"},
            }
            tally.add(payload, b"")
            del payload
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held / count <= TALLY_ITEM_OVERHEAD
    assert len(tally.counts) == 0 and len(tally.ids) == count  # counted, not yet settled
