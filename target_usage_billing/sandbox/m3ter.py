"""m3ter's read side, as the sandbox serves it (at the root, with a token from /oauth/token).

Confirmed against m3ter 0.9.0 (``meters.list``, ``accounts.list``, ``usage.query``,
``events.list``): lists answer ``{"data": [...], "nextToken": ...}`` (``SyncCursor``) and
take list parameters comma-separated. The sandbox knows every meter and account code it
has stored a measurement for, each with a UUID derived from its code. ``usage.query``
(``POST /organizations/{org}/usage/query``) totals the stored measurements; its row shape
is not published (the SDK types rows as plain objects): the rows here are the sandbox's
own, documented in server.py. A measurement reported invalid after the acknowledgement
(fault ``invalid-after-ack``) is not counted, as m3ter does not ingest it, and is listed
as an ``ingest.validation.failure`` Event.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
import time
import typing as t

from target_usage_billing.sandbox.readside import (
    Reader,
    answer,
    decode,
    first,
    iso,
    many,
    parse_time,
    stable_id,
)
from target_usage_billing.sandbox.replies import Reply

_ORG_PATH = re.compile(r"/organizations/([^/]+)/(meters|accounts|usage/query|events)\Z")
MAX_ROWS = 20_000  # m3ter: a query returns at most 20,000 data items
MEASURES = ("measure", "cost", "income")
DIMENSIONS = ("who", "what", "where", "other")
FUNCTIONS = {"MEASURE": ("SUM", "MIN", "MAX", "COUNT", "LATEST", "MEAN"), "DIMENSION": ("COUNT", "UNIQUE")}
FAILURE_EVENT = "ingest.validation.failure"
INJECTED = "sandbox fault invalid-after-ack"
FAILURE_TYPE = "UndefinedMeter"  # "the submitted usage data measurement IS NOT ingested"


def read_route(method: str, path: str, headers: t.Mapping[str, str], sandbox: t.Any) -> Reader | None:
    match = _ORG_PATH.match(path)
    if match is None:
        return None
    org, what = match.groups()
    readers: dict[tuple[str, str], Reader] = {
        ("GET", "meters"): lambda query, body: _codes("meter", query, sandbox),
        ("GET", "accounts"): lambda query, body: _codes("account", query, sandbox),
        ("POST", "usage/query"): lambda query, body: _usage_query(body, sandbox),
        ("GET", "events"): lambda query, body: _failure_events(org, query, sandbox),
    }
    reader = readers.get((method, what))
    if reader is None:
        return None

    def authenticated(query: t.Mapping[str, list[str]], body: bytes) -> Reply:
        _authenticate(headers, sandbox)
        return reader(query, body)

    return authenticated


def _authenticate(headers: t.Mapping[str, str], sandbox: t.Any) -> None:
    header = headers.get("Authorization", "")
    token = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
    with sandbox.lock:
        expiry = sandbox.tokens.get(token)
    if expiry is None or time.monotonic() >= expiry:
        raise answer(403, {"message": "Forbidden or Unauthorized: token invalid or expired"})


def _bad(message: str) -> Reply:
    return answer(400, {"message": message})


def _measurements(sandbox: t.Any) -> list[tuple[dict[str, t.Any], float, bool]]:
    with sandbox.lock:
        return [(decode(item.raw), item.received_at, item.invalid) for item in sandbox.stores["m3ter"].scan()]


def _page(query: t.Mapping[str, list[str]], items: list[dict[str, t.Any]]) -> Reply:
    try:
        size = max(1, min(int(first(query, "pageSize") or 100), 200))
        start = int(first(query, "nextToken") or 0)
    except ValueError:
        raise _bad("pageSize and nextToken must be whole numbers") from None
    page = items[start : start + size]
    more = start + size < len(items)
    return answer(200, {"data": page, "nextToken": str(start + size) if more else None})


def _codes(kind: str, query: t.Mapping[str, list[str]], sandbox: t.Any) -> Reply:
    """The meters (or accounts) the stored measurements name, filtered by codes / ids."""
    codes = sorted({str(m[kind]) for m, _at, _invalid in _measurements(sandbox) if m.get(kind)})
    wanted_codes, wanted_ids = set(many(query, "codes", comma=True)), set(many(query, "ids", comma=True))
    items = []
    for code in codes:
        item_id = stable_id(f"m3ter-{kind}", code)
        if (wanted_codes and code not in wanted_codes) or (wanted_ids and item_id not in wanted_ids):
            continue
        items.append({"id": item_id, "code": code, "name": code, "version": 1})
    return _page(query, items)


def _usage_query(body: bytes, sandbox: t.Any) -> Reply:
    try:
        request = json.loads(body or b"{}")
        start, end = parse_time(request["startDate"]), parse_time(request["endDate"])
    except KeyError as exc:
        raise _bad(f"{exc.args[0]} is required") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise _bad(f"invalid query: {exc}") from None
    meter_ids, account_ids = set(request.get("meterIds") or ()), set(request.get("accountIds") or ())
    aggregations = request.get("aggregations") or []
    for rule in aggregations:
        allowed = FUNCTIONS.get(str(rule.get("fieldType"))) if isinstance(rule, dict) else None
        if allowed is None or rule.get("function") not in allowed or not rule.get("meterId"):
            raise _bad(f"invalid aggregation {rule!r}: functions by field type are {FUNCTIONS}")
    group_specs = [g for g in request.get("groups") or [] if isinstance(g, dict)]
    groups = [g.get("groupType") for g in group_specs]
    if groups and not aggregations:
        raise _bad("groups need aggregations")
    if "DIMENSION" in groups:
        raise _bad("the sandbox does not emulate grouping by DIMENSION")
    frequency = next((g.get("frequency", "DAY") for g in group_specs if g.get("groupType") == "TIME"), None)
    if frequency is not None and frequency not in _BUCKETS:
        raise _bad(f"frequency must be one of {', '.join(_BUCKETS)}")
    try:
        limit = min(int(request.get("limit") or MAX_ROWS), MAX_ROWS)
    except (TypeError, ValueError):
        raise _bad("limit must be a whole number") from None
    filters = request.get("dimensionFilters") or []
    selected = []
    for measurement, received_at, invalid in _measurements(sandbox):
        meter_id = stable_id("m3ter-meter", str(measurement.get("meter")))
        account_id = stable_id("m3ter-account", str(measurement.get("account")))
        if (
            invalid
            or (meter_ids and meter_id not in meter_ids)
            or (account_ids and account_id not in account_ids)
        ):
            continue
        moment = parse_time(measurement["ts"])
        if not start <= moment < end or not _passes(measurement, meter_id, filters):
            continue
        selected.append((received_at, moment, meter_id, account_id, measurement))
    if not aggregations:  # the measurements themselves, most recently received first
        selected.sort(key=lambda row: row[0], reverse=True)
        rows = [row[4] for row in selected]
        return answer(200, {"data": rows[:limit], "hasMoreData": len(rows) > limit})
    rows = _aggregate(selected, aggregations, "ACCOUNT" in groups, frequency)
    return answer(200, {"data": rows[:limit], "hasMoreData": len(rows) > limit})


def _passes(measurement: dict[str, t.Any], meter_id: str, filters: list[dict[str, t.Any]]) -> bool:
    for rule in filters:
        if rule.get("meterId") != meter_id:
            continue
        values = {
            field.get(rule.get("fieldCode"))
            for c in DIMENSIONS
            if isinstance(field := measurement.get(c), dict)
        }
        if not values & set(rule.get("values") or ()):
            return False
    return True


def _aggregate(
    selected: list[tuple[float, dt.datetime, str, str, dict[str, t.Any]]],
    aggregations: list[dict[str, t.Any]],
    by_account: bool,
    frequency: str | None,
) -> list[dict[str, t.Any]]:
    groups: dict[tuple[t.Any, ...], list[tuple[float, dt.datetime, dict[str, t.Any]]]] = {}
    for received_at, moment, meter_id, account_id, measurement in selected:
        bucket = _BUCKETS[frequency](moment) if frequency else None
        key = (
            meter_id,
            measurement["meter"],
            account_id if by_account else None,
            measurement["account"] if by_account else None,
            bucket,
        )
        groups.setdefault(key, []).append((received_at, moment, measurement))
    rows = []
    for (meter_id, meter_code, account_id, account_code, bucket), members in sorted(
        groups.items(), key=lambda g: [str(p) for p in g[0]]
    ):
        for rule in aggregations:
            if rule.get("meterId") != meter_id:
                continue
            categories = MEASURES if rule.get("fieldType") == "MEASURE" else DIMENSIONS
            values = [
                (moment, field[rule.get("fieldCode")])
                for _at, moment, measurement in members
                for category in categories
                if isinstance(field := measurement.get(category), dict) and rule.get("fieldCode") in field
            ]
            row: dict[str, t.Any] = {"meterId": meter_id, "meterCode": meter_code}
            if account_id is not None:
                row.update(accountId=account_id, accountCode=account_code)
            if bucket is not None:
                row.update(startDate=iso(bucket[0], millis=False), endDate=iso(bucket[1], millis=False))
            row.update(
                fieldCode=rule.get("fieldCode"),
                fieldType=rule.get("fieldType"),
                function=rule.get("function"),
                value=_apply(str(rule.get("function")), values),
                count=len(values),
            )
            rows.append(row)
    return rows


def _apply(function: str, values: list[tuple[dt.datetime, t.Any]]) -> t.Any:
    numbers = [decimal.Decimal(v) if isinstance(v, (int, decimal.Decimal)) else v for _m, v in values]
    if function == "COUNT":
        return len(values)
    if function == "UNIQUE":
        return len({str(v) for v in numbers})
    if not numbers:
        return None
    if function == "SUM":
        return sum(numbers, decimal.Decimal(0))
    if function == "MIN":
        return min(numbers)
    if function == "MAX":
        return max(numbers)
    if function == "MEAN":
        return sum(numbers, decimal.Decimal(0)) / len(numbers)
    if function == "LATEST":
        return max(zip((m for m, _v in values), range(len(values)), numbers))[2]
    raise _bad(f"unknown aggregation function {function!r}")


def _day(moment: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    start = moment.astimezone(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + dt.timedelta(days=1)


def _hour(moment: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    start = moment.astimezone(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
    return start, start + dt.timedelta(hours=1)


def _week(moment: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    day = _day(moment)[0]
    start = day - dt.timedelta(days=day.weekday())  # weeks start on Monday (ISO 8601)
    return start, start + dt.timedelta(days=7)


def _months(moment: dt.datetime, size: int) -> tuple[dt.datetime, dt.datetime]:
    day = _day(moment)[0]
    month = (day.month - 1) // size * size
    start = day.replace(month=month + 1, day=1)
    end_month = month + size
    end = start.replace(year=start.year + end_month // 12, month=end_month % 12 + 1)
    return start, end


_BUCKETS: dict[str, t.Callable[[dt.datetime], tuple[dt.datetime, dt.datetime]]] = {
    "HOUR": _hour,
    "DAY": _day,
    "WEEK": _week,
    "MONTH": lambda moment: _months(moment, 1),
    "QUARTER": lambda moment: _months(moment, 3),
}


def _failure_events(org: str, query: t.Mapping[str, list[str]], sandbox: t.Any) -> Reply:
    """``ingest.validation.failure`` Events, one per measurement reported invalid."""
    name, kind = first(query, "eventName"), first(query, "eventType")
    ids, account = set(many(query, "ids", comma=True)), first(query, "accountId")
    events = []
    if name in (None, FAILURE_EVENT) and kind in (None, "IngestValidationFailure"):
        for measurement, received_at, invalid in _measurements(sandbox):
            if not invalid:
                continue
            account_id = stable_id("m3ter-account", str(measurement.get("account")))
            event_id = stable_id("m3ter-event", str(measurement.get("uid")), str(received_at))
            if (ids and event_id not in ids) or (account and account != account_id):
                continue
            data = {
                "type": FAILURE_TYPE,
                "message": f"Meter {measurement.get('meter')!r} does not exist ({INJECTED})",
                "uid": measurement.get("uid"),
                "meter": measurement.get("meter"),
                "account": measurement.get("account"),
                "accountId": account_id,
                "ts": measurement.get("ts"),
                "measurement": measurement,
            }
            events.append(
                {
                    "id": event_id,
                    "eventName": FAILURE_EVENT,
                    "eventTime": iso(received_at),
                    "dtActioned": None,
                    "m3terEvent": {"eventName": FAILURE_EVENT, "organizationId": org, "eventData": data},
                }
            )
    return _page(query, events)
