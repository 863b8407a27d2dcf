"""What a run says: progress lines while it reads, the summary and METRIC points at the end."""

from __future__ import annotations

import json
import logging
import threading
import typing as t

from singer_sdk.metrics import get_metrics_logger

from target_usage_billing.run import state_encoder

if t.TYPE_CHECKING:
    from target_usage_billing.run import BillingRun

logger = logging.getLogger("target-usage-billing")


def start_progress(run: BillingRun) -> None:
    interval = run.settings.progress_interval_seconds
    if interval <= 0 or run.progress_thread is not None:
        return

    def report() -> None:
        while not run.finished.wait(interval):
            logger.info(progress_line(run))

    run.progress_thread = threading.Thread(target=report, name="progress", daemon=True)
    run.progress_thread.start()


def progress_line(run: BillingRun) -> str:
    stats = run.stats
    read = stats.total("read")
    rate = read / stats.elapsed if stats.elapsed > 0 else 0.0
    return (
        f"progress: read {read}, mapped {stats.total('mapped')}, sent {stats.total('sent')}, "
        f"rejected {stats.total('rejected')}, requests {stats.total('requests')}, "
        f"retries {stats.total('retries')}, {rate:,.0f} records/s, in flight {run.delivery.in_flight}"
    )


def summary_lines(run: BillingRun) -> list[str]:
    stats, transport = run.stats, run.transport.stats
    throttled = (
        f", waited {transport.throttled_seconds:.1f}s for the rate limit"
        if transport.throttled_seconds >= 0.1
        else ""
    )
    noun = run.destination.item_noun
    dry = run.dry_run is not None
    sent = "would send" if dry else "sent"
    mode = " (dry run: nothing was sent, no STATE was written)" if dry else ""
    lines = [f"Summary for {run.destination.label}{mode}, {stats.elapsed:.1f}s:"]
    for name, s in sorted(stats.streams.items()):
        duplicates = f", duplicates {s.duplicates}" if s.duplicates else ""
        if s.already_stored:
            duplicates += f", already stored {s.already_stored}"
        lines.append(
            f"  stream {name}: read {s.read}, filtered {s.filtered}, unmapped {s.unmapped}, "
            f"{sent} {s.sent} {noun}, rejected {s.rejected}{duplicates}, requests {s.requests}, "
            f"retries {s.retries}"
        )
        for reason, count in s.reasons.most_common(3):
            lines.append(f"    rejected {count} x {reason}")
        if dry and name in run.rule_by_stream:
            rule = run.rule_by_stream[name]
            lines.append(
                f"    rule: {rule.where if rule is not None else 'none (unmatched_streams is skip)'}"
            )
            if name in run.first_payloads:
                shown = state_encoder.encode(run.first_payloads[name]).decode()
                lines.append(f"    first payload: {shown[:1000]}{'...' if len(shown) > 1000 else ''}")
    states = (
        f"STATE messages withheld {run.states_withheld}"
        if dry
        else f"STATE messages emitted {run.states_emitted}"
    )
    duplicates_total = stats.total("duplicates")
    lines.append(
        f"  total: {sent} {stats.total('sent')} {noun} in {stats.total('requests')} requests, "
        f"{stats.total('retries')} retries, rejected {stats.total('rejected')}, "
        + (f"duplicates skipped {duplicates_total}, " if duplicates_total else "")
        + f"{states}{throttled}"
    )
    if transport.statuses:
        answers = ", ".join(f"{status} x {n}" for status, n in sorted(transport.statuses.items()))
        lines.append(f"  HTTP answers (authentication included): {answers}")
    if run.dead_letters.count:
        lines.append(f"  dead letters: {run.dead_letters.count} in {run.dead_letters.path}")
    if run.journal is not None:
        lines.append(
            f"  journal: {run.journal.acknowledged_items} acknowledged items recorded in "
            f"{run.journal.store.where} (run {run.journal.run_id}); read them back with --reconcile"
        )
    if run.skipped_messages:
        skipped = ", ".join(f"{kind} x {n}" for kind, n in sorted(run.skipped_messages.items()))
        lines.append(f"  messages skipped: {skipped}")
    for rule in run.unused_rules():
        lines.append(f"  {rule.where} matched no stream")
    if dry:
        lines.append(f"  request bodies written to {run.settings.dry_run_path}")
    return lines


def metric_points(run: BillingRun) -> list[dict]:
    """The summary as singer-sdk METRIC points, one set per stream."""
    points = []
    elapsed = round(run.stats.elapsed, 3)
    for name, s in sorted(run.stats.streams.items()):
        tags = {"stream": name, "destination": run.destination.name}
        for metric, value in (
            ("usage_billing.read", s.read),
            ("usage_billing.filtered", s.filtered),
            ("usage_billing.unmapped", s.unmapped),
            ("usage_billing.sent", s.sent),
            ("usage_billing.duplicates", s.duplicates),
            ("usage_billing.already_stored", s.already_stored),
            ("usage_billing.rejected", s.rejected),
            ("usage_billing.requests", s.requests),
            ("usage_billing.retries", s.retries),
        ):
            points.append({"type": "counter", "metric": metric, "value": value, "tags": tags})
        points.append(
            {"type": "timer", "metric": "usage_billing.run_duration", "value": elapsed, "tags": tags}
        )
    return points


def log_metrics(run: BillingRun) -> None:
    metrics_logger = get_metrics_logger()
    for point in metric_points(run):
        metrics_logger.info("METRIC: %s", json.dumps(point, separators=(",", ":")))
