"""The platforms' read side: where a client reads back what the sandbox kept.

Each platform module has ``read_route(method, path, headers, sandbox)``: the reader of
that request (it authenticates as the platform's ingest does, then answers from the
store), or None when the request is not one of its reads. Faults apply to ingest
requests only; ``read_requests`` in the stats counts the reads. What the sandbox knows:
every meter, account, customer and event type it has stored an item for; ids it makes up
(m3ter meter/account ids, Metronome customer/metric ids, Stripe meter ids) are derived
from the codes, the same in every run. Items lost after the acknowledgement are absent
everywhere; items reported invalid after it are flagged as listed below.

m3ter (at the root; Bearer token from /oauth/token, else 403):
  GET  /organizations/{org}/meters | /accounts  ?codes=a,b &ids=.. &pageSize (100, max 200)
       &nextToken -> {"data": [{"id", "code", "name", "version"}], "nextToken": str|null}
  POST /organizations/{org}/usage/query  {"startDate", "endDate" (both required; ts in
       [start, end)), "meterIds", "accountIds", "dimensionFilters": [{"meterId",
       "fieldCode", "values"}], "aggregations": [{"meterId", "fieldCode", "fieldType":
       MEASURE|DIMENSION, "function"}], "groups": [{"groupType": ACCOUNT|TIME, "frequency":
       HOUR|DAY|WEEK|MONTH|QUARTER (TIME; default DAY)}], "limit" (max 20,000)}
       -> {"data": rows, "hasMoreData"}; without aggregations the rows are the stored
       measurements, most recently received first; with them one row per group and
       aggregation: {"meterId", "meterCode", ["accountId", "accountCode"], ["startDate",
       "endDate"], "fieldCode", "fieldType", "function", "value" (exact decimal), "count"}.
       Invalid measurements are not counted.
  GET  /organizations/{org}/events  ?eventName &eventType &ids &accountId &pageSize
       &nextToken -> {"data": [{"id", "eventName": "ingest.validation.failure",
       "eventTime", "dtActioned": null, "m3terEvent": {"eventName", "organizationId",
       "eventData": {"type": "UndefinedMeter", "message", "uid", "meter", "account",
       "accountId", "ts", "measurement"}}}], "nextToken"}: one per invalid measurement.
Metronome (at the root; Bearer API token, else 403):
  POST /v1/events/search  {"transactionIds": [1 to 100]} -> [{"id", "transaction_id",
       "customer_id", "event_type", "timestamp", "properties", "is_duplicate": false,
       "processed_at", "matched_customer": {"id", "name"}|null, "matched_billable_metrics":
       [{"id", "name", "aggregation_type": "COUNT", "event_type_filter"}]}], in the order
       asked, ids not found (or older than 34 days) absent; invalid: null and [].
Orb (under /orb; Bearer API key, else 401):
  POST /v1/events/search  {"event_ids", "timeframe_start" (default a week ago),
       "timeframe_end" (default now, exclusive)} -> {"data": [{"id", "customer_id",
       "external_customer_id", "deprecated": false, "event_name", "properties",
       "timestamp"}]}
  GET  /v1/events/volume  ?timeframe_start (required) &timeframe_end &limit (20) &cursor
       -> {"data": [{"count", "timeframe_start", "timeframe_end"}] (UTC hours that have
       events, oldest first), "pagination_metadata": {"has_more", "next_cursor"}}
Lago (under /lago; Bearer API key, else 401):
  GET  /api/v1/events/{transaction_id} -> {"event": {"lago_id", "transaction_id",
       "lago_customer_id": null, "lago_subscription_id": null, "external_subscription_id",
       "code", "timestamp" (ISO 8601), "precise_total_amount_cents", "properties",
       "created_at"}}; 404 {"status": 404, "error": "Not Found", "code": "event_not_found"}
OpenMeter (under /openmeter; Bearer token unless started without one, else 401):
  GET  /api/v1/events  ?from (default 72 hours ago) &to (event time, inclusive)
       &ingestedAtFrom &ingestedAtTo &id &subject (partial) &customerId (matches nothing)
       &limit (100, max 100) -> [{"event": CloudEvent as stored, "ingestedAt",
       "storedAt", "validationError" (invalid only)}], newest event time first
Stripe (under /stripe; Bearer secret key, else 401):
  GET  /v1/billing/meters  ?limit (10, max 100) &starting_after -> a v1 list of
       billing.meter (one per stored event_name; value key "value", customer key
       "stripe_customer_id", formula sum); GET /v1/billing/meters/{id} -> the meter
  GET  /v1/billing/meters/{id}/event_summaries  ?customer &start_time &end_time (Unix
       seconds, minute-aligned, end exclusive) &value_grouping_window (hour|day) &limit
       &starting_after -> a v1 list of billing.meter_event_summary {"id",
       "aggregated_value" (exact decimal), "start_time", "end_time", "meter", "livemode"},
       newest window first, valid events only
  GET  /v2/core/events  ?object_id (a meter id) &types &limit (20) -> {"data": [v2.core.event
       of type v1.billing.meter.error_report_triggered: one per meter and ingest request
       with invalid events, newest first, data.reason.error_types[0] {"code":
       "meter_event_customer_not_found", "error_count", "sample_errors": [{"error_message",
       "request": {"identifier"}}] (every invalid event)}], "next_page_url": null}
"""

from __future__ import annotations

import typing as t

from target_usage_billing.sandbox import lago, m3ter, metronome, openmeter, orb, stripe
from target_usage_billing.sandbox.readside import Reader
from target_usage_billing.sandbox.replies import Reply

_AT_ROOT = {"m3ter": m3ter, "metronome": metronome}
_PREFIXED = {module.NAME: module for module in (orb, lago, openmeter, stripe)}


def route(method: str, path: str, headers: t.Any, sandbox: t.Any) -> Reader | None:
    for name, module in _PREFIXED.items():
        if path.startswith(module.PREFIX + "/"):
            return _counted(
                name, module.read_route(method, path[len(module.PREFIX) :], headers, sandbox), sandbox
            )
    for name, module in _AT_ROOT.items():
        reader = module.read_route(method, path, headers, sandbox)
        if reader is not None:
            return _counted(name, reader, sandbox)
    return None


def _counted(name: str, reader: Reader | None, sandbox: t.Any) -> Reader | None:
    if reader is None:
        return None

    def counted(query: t.Mapping[str, list[str]], body: bytes) -> Reply:
        with sandbox.lock:
            sandbox.stats[name].read_requests += 1
        return reader(query, body)

    return counted
