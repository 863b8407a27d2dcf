"""The in-run id ledger: right answers, and memory bounded by its budget by construction."""

from __future__ import annotations

import pytest

from target_usage_billing.ledger import CONFLICT, DUPLICATE, NEW, IdLedger


def test_new_duplicate_and_conflict():
    ledger = IdLedger()
    assert ledger.check("a", b"1") == NEW
    assert ledger.check("a", b"1") == DUPLICATE
    assert ledger.check("a", b"2") == CONFLICT
    assert ledger.first_body_hash == hash(b"1")
    assert ledger.check("b", b"1") == NEW


@pytest.mark.parametrize("megabytes", [1, 2, 4])
def test_memory_never_exceeds_the_budget_whatever_the_number_of_ids(megabytes):
    budget = megabytes * 2**20
    ledger = IdLedger(max_bytes=budget)
    assert ledger.max_bytes <= budget
    peak = 0
    total = ledger.remembered * 5  # five generations' worth: the oldest leave
    for n in range(total):
        ledger.check(f"id-{n}", b"body")
        if not n & 1023:
            peak = max(peak, ledger.memory_bytes)
    peak = max(peak, ledger.memory_bytes)
    assert peak <= budget
    assert ledger.count == total
    # the most recent `remembered` ids are all still known, with their bodies
    for n in range(total - ledger.remembered, total):
        assert ledger.check(f"id-{n}", b"body") == DUPLICATE
    assert ledger.check(f"id-{total - 1}", b"other") == CONFLICT


def test_the_oldest_ids_leave_the_ledger():
    ledger = IdLedger(max_bytes=2**20)
    ledger.check("first", b"x")
    for n in range(ledger.remembered * 3):
        ledger.check(f"id-{n}", b"x")
    assert ledger.check("first", b"y") == NEW  # forgotten: the run journal checks beyond this


def test_ids_of_the_previous_generation_are_still_checked():
    ledger = IdLedger(max_bytes=2**20)
    for n in range(ledger.remembered + 10):  # the first generation filled and rotated
        ledger.check(f"id-{n}", b"x")
    assert ledger.check("id-0", b"x") == DUPLICATE
    assert ledger.check("id-1", b"changed") == CONFLICT


def test_what_python_allocates_for_the_ledger_stays_within_its_budget():
    # memory_bytes counts the tables the ledger means to hold; tracemalloc counts what is
    # really allocated (a zeroed copy made while allocating, a generation still referenced)
    import tracemalloc

    budget = 2**20
    tracemalloc.start()
    try:
        ledger = IdLedger(max_bytes=budget)
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        for n in range(ledger.remembered * 5):
            ledger.check(f"id-{n}", b"body")
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert peak <= budget + 64 * 1024  # the tables, and a few small objects
