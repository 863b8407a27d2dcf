"""History beyond the live windows: usage older than a platform takes (Metronome 34 days,
Stripe 35), and re-sends after a platform's de-duplication window (the run journal)."""

from __future__ import annotations

import sqlite3

import pytest

from tests.helpers import RECENT, dead_letters, run_target, singer, usage
from tests.platforms import config_for

DAY = 86400
JOURNAL = "target-usage-billing-journal.sqlite"


@pytest.mark.parametrize(("destination", "days"), [("metronome", 34), ("stripe", 35)])
def test_usage_outside_the_window_is_counted_per_stream_and_dead_lettered(
    sandbox, tmp_path, destination, days
):
    rows = usage(6)
    for row in rows[:4]:
        row["at"] = RECENT - (days + 2) * DAY - row["id"]
    config = config_for(destination, sandbox, max_rejected_ratio=1)
    result = run_target(tmp_path, config, singer("usage", rows, state={"at": 6}))
    assert result.returncode == 0, result.stderr
    assert sandbox.stats(destination)["stored"] == 2
    dead = dead_letters(tmp_path)
    assert sorted(d["record"]["id"] for d in dead) == [0, 1, 2, 3]
    for letter in dead:
        assert letter["stage"] == "validation" and f"more than {days} days in the past" in letter["reason"]
    label = {"metronome": "Metronome", "stripe": "Stripe"}[destination]
    # said once while it runs, then counted for the stream in the summary, under one reason
    assert result.stderr.count(f"records outside {label}'s time window are dead-lettered") == 1
    assert f"outside {label}'s time window: 4 records, dead-lettered (stage validation)" in result.stderr
    assert f"rejected 4 x validation: timestamp is more than {days} days in the past" in result.stderr
    assert result.states == [{"at": 6}]  # dead-lettered: done, so the STATE goes


# --- the re-send horizon -------------------------------------------------------------------


def age_journal(directory, hours: float) -> None:
    """Make everything the journal holds look acknowledged ``hours`` earlier."""
    with sqlite3.connect(directory / JOURNAL) as db:
        for table in ("journal_samples", "journal_tail_times"):
            db.execute(
                f"UPDATE {table} SET sent_at = strftime('%Y-%m-%dT%H:%M:%SZ', sent_at, ?)",
                (f"-{hours * 3600:.0f} seconds",),
            )


def stripe_rows(count: int, start: int = 0) -> list[dict]:
    return [{**row, "account": "cus_1"} for row in usage(count, start)]  # one customer, meter, day


def send(tmp_path, sandbox, rows, **settings):
    config = config_for("stripe", sandbox, batch_size_rows=5, **settings)
    return run_target(tmp_path, config, singer("usage", rows, key_properties=["id"], state={"at": len(rows)}))


def test_a_replay_of_usage_stripe_acknowledged_over_24_hours_ago_is_refused(sandbox, tmp_path):
    rows = stripe_rows(10)
    assert send(tmp_path, sandbox, rows).returncode == 0
    # within Stripe's 24 hours a replay is harmless (de-duplicated): it goes
    again = send(tmp_path, sandbox, rows)
    assert again.returncode == 0, again.stderr
    age_journal(tmp_path, 25)
    received = sandbox.stats("stripe")["items_received"]
    refused = send(tmp_path, sandbox, rows)
    assert refused.returncode == 2, refused.stderr
    (error,) = refused.error_lines
    assert "stream 'usage'" in error and "acknowledged by Stripe at" in error
    assert "(24 hours): sent again, they would be billed twice" in error
    assert "allow_resend_beyond_dedup_window" in error
    assert sandbox.stats("stripe")["items_received"] == received  # nothing of it was sent
    assert refused.states == []
    # forced: sent, said once, and counted in the summary
    forced = send(tmp_path, sandbox, rows, allow_resend_beyond_dedup_window=True)
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr.count("sending anyway (allow_resend_beyond_dedup_window)") == 1
    counted = "ids Stripe acknowledged more than 24 hours ago (allow_resend_beyond_dedup_window)"
    assert counted in forced.stderr
    assert sandbox.stats("stripe")["items_received"] == received + 10


def test_a_resume_after_the_window_does_not_send_the_last_batch_again(sandbox, tmp_path):
    # journal_sample_rate 0: only the first id of the bucket is sampled; the last batch
    # (ids 5..9, what a resume re-sends past its STATE, or a tap re-reading its boundary
    # row) is known id by id: those ids are not sent again, the rest of the batch is
    rows = stripe_rows(10)
    assert send(tmp_path, sandbox, rows, journal_sample_rate=0).returncode == 0
    age_journal(tmp_path, 25)
    received = sandbox.stats("stripe")["items_received"]
    # a batch of nothing but such ids sends nothing, and the STATE after it still goes
    boundary = send(tmp_path, sandbox, rows[8:], journal_sample_rate=0)
    assert boundary.returncode == 0, boundary.stderr
    assert sandbox.stats("stripe")["items_received"] == received
    assert boundary.states == [{"at": 2}]
    resumed = send(tmp_path, sandbox, [*rows[7:], *stripe_rows(2, start=10)], journal_sample_rate=0)
    assert resumed.returncode == 0, resumed.stderr
    assert sandbox.stats("stripe")["items_received"] == received + 2  # only ids 10 and 11
    assert resumed.stderr.count("they are not sent again (the journal holds each of them") == 1
    assert "not sent again: 3 ids Stripe acknowledged more than 24 hours ago" in resumed.stderr
    assert resumed.states == [{"at": 5}]


def test_ids_neither_sampled_nor_in_the_tail_are_not_recognised(sandbox, tmp_path):
    # the documented limit of a bounded journal: ids 2 and 3 were neither the bucket's
    # first (sampled) nor in the last batch, so their re-send is not seen
    rows = stripe_rows(10)
    assert send(tmp_path, sandbox, rows, journal_sample_rate=0).returncode == 0
    age_journal(tmp_path, 25)
    unseen = send(tmp_path, sandbox, rows[2:4], journal_sample_rate=0)
    assert unseen.returncode == 0, unseen.stderr
    assert "billed again" not in unseen.stderr


def test_m3ter_keeps_ids_for_35_days(sandbox, tmp_path):
    rows = usage(3)
    config = config_for("m3ter", sandbox)
    lines = singer("usage", rows, key_properties=["id"])
    assert run_target(tmp_path, config, lines).returncode == 0
    age_journal(tmp_path, 34 * 24)
    assert run_target(tmp_path, config, lines).returncode == 0  # still within 35 days
    age_journal(tmp_path, 2 * 24)
    received = sandbox.stats("m3ter")["items_received"]
    late = run_target(tmp_path, config, lines)  # the last batch, again: known id by id
    assert late.returncode == 0, late.stderr
    assert "not sent again: 3 ids m3ter acknowledged more than 35 days ago" in late.stderr
    assert sandbox.stats("m3ter")["items_received"] == received


def test_without_the_journal_the_run_says_what_it_cannot_see(sandbox, tmp_path):
    result = send(tmp_path, sandbox, stripe_rows(2), journal=False)
    assert result.returncode == 0, result.stderr
    said = "The run journal is off: a re-send of usage Stripe acknowledged more than 24 hours ago"
    assert said in result.stderr


def test_metronome_keeps_ids_for_34_days(sandbox, tmp_path):
    # usage of 33.5 days ago: still inside Metronome's 34-day time window, and old enough
    # that its ids can have been acknowledged more than 34 days ago (sent up to a day ahead
    # of its timestamps); the check looks up sampled ids only for such days
    rows = [{**row, "at": row["at"] - 33 * DAY - 11 * 3600} for row in usage(10)]
    config = config_for("metronome", sandbox, batch_size_rows=5)
    lines = singer("usage", rows, key_properties=["id"], state={"at": 10})
    assert run_target(tmp_path, config, lines).returncode == 0
    age_journal(tmp_path, 33 * 24)
    within = run_target(tmp_path, config, lines)  # de-duplicated by Metronome: harmless
    assert within.returncode == 0, within.stderr
    assert "billed twice" not in within.stderr
    age_journal(tmp_path, 36)  # acknowledged 34.5 days ago
    received = sandbox.stats("metronome")["items_received"]

    late = run_target(tmp_path, config, lines)  # ids 0..4 are sampled, not the last batch

    assert late.returncode == 2, late.stderr
    (error,) = late.error_lines
    assert "stream 'usage'" in error and "acknowledged by Metronome at" in error
    assert "(34 days): sent again, they would be billed twice" in error
    assert "allow_resend_beyond_dedup_window" in error
    assert sandbox.stats("metronome")["items_received"] == received  # nothing of it was sent
    assert late.states == []
    stats = sandbox.stats("metronome")
    assert stats["stored"] == 10 and stats["conflicts"] == 0
