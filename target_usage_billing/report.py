"""What a run says: progress lines while it reads, the summary and METRIC points at the end."""

from __future__ import annotations

import json
import logging
import threading
import typing as t

from singer_sdk.metrics import get_metrics_logger

from target_usage_billing.horizon import span
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
        f"retries {stats.total('retries')}, {rate:,.0f} records/s, in flight {run.delivery.in_flight} "
        f"(level {run.delivery.limit.describe()})"
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
        plan = run.plan_by_stream.get(name)
        if s.mappings and plan is not None:  # several mappings bill this stream: each one's share
            for rule in plan.rules:
                share = s.mappings[rule.label]
                more = f", duplicates {share.duplicates}" if share.duplicates else ""
                if share.already_stored:
                    more += f", already stored {share.already_stored}"
                lines.append(
                    f"    {rule.where}: filtered {share.filtered}, "
                    f"{sent} {share.sent} {noun}, rejected {share.rejected}{more}"
                )
                for reason, count in share.reasons.most_common(3):
                    lines.append(f"      rejected {count} x {reason}")
                if dry:
                    lines += _first_payload(run, name, rule.label, "      ")
            continue
        for reason, count in s.reasons.most_common(3):
            lines.append(f"    rejected {count} x {reason}")
        lines += _history_lines(run, s, sent)
        if dry and name in run.plan_by_stream:
            first = plan.rules[0] if plan is not None else None
            lines.append(
                f"    rule: {first.where if first is not None else 'none (unmatched_streams is skip)'}"
            )
            if first is not None:
                lines += _first_payload(run, name, first.label, "    ")
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
    lines += [] if dry else _in_flight_lines(run)
    lines += run.destination.channel_summary()
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


def _in_flight_lines(run: BillingRun) -> list[str]:
    """How many requests were in flight (the adaptive level, concurrency.py)."""
    limit = run.delivery.limit
    if not run.stats.total("requests"):
        return []
    lowered = f", lowered {limit.decreases} times" if limit.decreases else ""
    return [f"  requests in flight: up to {limit.peak} (level now {limit.describe()}{lowered})"]


def _history_lines(run: BillingRun, s: t.Any, sent: str) -> list[str]:
    """Where a stream's usage outside the platform's live window went."""
    lines = []
    destination = run.destination
    if s.outside_window:
        lines.append(
            f"    outside {destination.label}'s time window: {s.outside_window} records, "
            f"dead-lettered (stage validation) in {run.dead_letters.path}"
        )
    if s.skipped_beyond_window:
        window = destination.dedup_window
        lines.append(
            f"    not sent again: {s.skipped_beyond_window} ids {destination.label} acknowledged more "
            f"than {span(window) if window else '?'} ago (the last batch of an earlier run)"
        )
    if s.resent_beyond_window:
        window = destination.dedup_window
        lines.append(
            f"    re-sent {s.resent_beyond_window} ids {destination.label} acknowledged more than "
            f"{span(window) if window else '?'} ago (allow_resend_beyond_dedup_window): billed again"
        )
    if s.channelled:
        lines.append(f"    {sent} {s.channelled} of them into {destination.label} {destination.channel_noun}")
    return lines


def _first_payload(run: BillingRun, stream: str, label: str, indent: str) -> list[str]:
    payload = run.first_payloads.get((stream, label))
    if payload is None:
        return []
    shown = state_encoder.encode(payload).decode()
    return [f"{indent}first payload: {shown[:1000]}{'...' if len(shown) > 1000 else ''}"]


def metric_points(run: BillingRun) -> list[dict]:
    """The summary as singer-sdk METRIC points: one set per stream, and per mapping
    (tagged ``mapping``: its name or ``mappings[INDEX]``) what each mapping did."""
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
        plan = run.plan_by_stream.get(name)
        if plan is None or plan.skip:
            continue
        for rule in plan.rules:  # each mapping's share (a lone mapping's is the stream's)
            share = s.mappings.get(rule.label, s)
            mapping_tags = {**tags, "mapping": rule.label}
            for metric, value in (
                ("usage_billing.mapping.filtered", share.filtered),
                ("usage_billing.mapping.sent", share.sent),
                ("usage_billing.mapping.duplicates", share.duplicates),
                ("usage_billing.mapping.already_stored", share.already_stored),
                ("usage_billing.mapping.rejected", share.rejected),
            ):
                points.append({"type": "counter", "metric": metric, "value": value, "tags": mapping_tags})
    return points


def log_metrics(run: BillingRun) -> None:
    metrics_logger = get_metrics_logger()
    for point in metric_points(run):
        # the point also as a field, for JSON logs (the text formatter shows the message)
        metrics_logger.info(
            "METRIC: %s", json.dumps(point, separators=(",", ":")), extra={"metric_info": point}
        )
