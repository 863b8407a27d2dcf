"""m3ter: measurements to POST {ingest_url}/organizations/{org}/measurements.

Contract (see billing-apis.md): OAuth2 client credentials on the auth host, tokens live
``expires_in`` seconds and an expired one is answered 403; body ``{"measurements": [...]}``
with 1..1000 items and under 512,000 bytes; ``uid`` de-duplicates re-sends for 35 days.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import re
import typing as t
import urllib.parse

from singer_sdk import typing as th

from target_usage_billing.destinations.base import (
    Acknowledgement,
    Destination,
    OutgoingRequest,
    Response,
    Ruling,
    TimeWindow,
    Verdict,
    json_document,
)
from target_usage_billing.destinations.readback import TotalKey, Window, iso, read_json
from target_usage_billing.destinations.tokens import ExpiringToken
from target_usage_billing.errors import DeliveryError
from target_usage_billing.journal import JournalFields
from target_usage_billing.mapping import FieldKind, FieldSpec, Preset
from target_usage_billing.retry import RetryableFailure

# Organization ids are UUIDs; anything outside this set would change the request path.
ORG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
# Clock difference allowed between this machine and m3ter's before a time counts as future.
FUTURE_TOLERANCE = 5
DATA_FIELD_CODE = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]{0,79}\Z")


# m3ter de-duplicates uid for 35 days (its FAQ; unconfirmed on the public site); it takes
# usage of any past time, so a re-send after that bills it again
DEDUP_WINDOW = dt.timedelta(days=35)


class M3terDestination(Destination):
    name = "m3ter"
    dedup_window = DEDUP_WINDOW
    envelope_key = "measurements"
    # SubmitMeasurementsResponse: {"result": "accepted"} (checked in judge_acknowledgement)
    acknowledgement = Acknowledgement((200,), "object")
    url_setting = "m3ter_ingest_url"
    journal_fields = JournalFields(
        "uid", ("account",), "meter", "ts", (("measure", None), ("cost", None), ("income", None))
    )
    label = "m3ter"
    item_noun = "measurements"
    max_items_per_request = 1000
    max_body_bytes = 511_999  # the API wants the body strictly under 512,000 bytes
    # 50 requests/s per organization and 5,000 per rolling 5 minutes per source IP.
    # A request is counted when it takes its slot and reaches the wire a little later
    # (tens of ms when the process is busy); requests are spaced evenly (ratelimit.py),
    # so the windows are widened by 6% (60 ms a second).
    rate_limits = ((50, 1.06), (5000, 318.0))
    presets: t.ClassVar[dict[str, Preset]] = {
        "segment": Preset(
            description="Segment track calls: uid <- messageId, ts <- timestamp, "
            "account <- context.groupId; you give meter and the data fields.",
            filter="type == 'track'",
            fields={"uid": "messageId", "ts": "timestamp", "account": "context.groupId"},
        ),
    }
    required_settings = ("m3ter_org_id", "m3ter_access_key_id", "m3ter_api_secret")
    settings: t.ClassVar[list[th.Property]] = [
        th.Property("m3ter_org_id", th.StringType, description="m3ter Organization id."),
        th.Property(
            "m3ter_access_key_id",
            th.StringType,
            description="Access key id of an m3ter Service User with measurements:upload.",
        ),
        th.Property(
            "m3ter_api_secret",
            th.StringType,
            secret=True,
            description="API secret of that Service User.",
        ),
        th.Property(
            "m3ter_ingest_url",
            th.StringType,
            default="https://ingest.m3ter.com",
            description="Base URL of m3ter's ingest API.",
        ),
        th.Property(
            "m3ter_auth_url",
            th.StringType,
            default="https://api.m3ter.com",
            description="Base URL of m3ter's OAuth token endpoint.",
        ),
    ]

    def __init__(self, config: t.Mapping[str, t.Any], transport: t.Any):
        super().__init__(config, transport)
        self._window = TimeWindow(None, dt.timedelta(seconds=FUTURE_TOLERANCE))
        self.org_id = config.get("m3ter_org_id") or "dry-run-org"
        self.ingest_url = config.get("m3ter_ingest_url", "https://ingest.m3ter.com").rstrip("/")
        self.auth_url = config.get("m3ter_auth_url", "https://api.m3ter.com").rstrip("/")
        self.ingest_path = f"/organizations/{self.org_id}/measurements"
        self._token = ExpiringToken(self._fetch_token)

    @classmethod
    def config_errors(cls, config: t.Mapping[str, t.Any], *, dry_run: bool) -> list[str]:
        problems = super().config_errors(config, dry_run=dry_run)
        org = config.get("m3ter_org_id")
        if isinstance(org, str) and org and not ORG_ID.match(org):
            problems.append(f"m3ter_org_id: {org[:80]!r} is not an Organization id (letters, digits, '-')")
        return problems

    @classmethod
    def field_specs(cls, config: t.Mapping[str, t.Any]) -> list[FieldSpec]:
        strings = [
            FieldSpec(name, FieldKind.STRING_MAP, key_pattern=DATA_FIELD_CODE)
            for name in ("who", "what", "where", "other", "metadata")
        ]
        numbers = [
            FieldSpec(name, FieldKind.NUMBER_MAP, key_pattern=DATA_FIELD_CODE)
            for name in ("measure", "cost", "income")
        ]
        return [
            FieldSpec("uid", FieldKind.ID),
            FieldSpec("meter", FieldKind.STRING, required=True),
            FieldSpec("account", FieldKind.STRING, required=True),
            FieldSpec("ts", FieldKind.TIMESTAMP, required=True),
            FieldSpec("ets", FieldKind.TIMESTAMP),
            *strings,
            *numbers,
        ]

    def validate_payload(self, payload: dict[str, t.Any]) -> str | None:
        # m3ter refuses usage stamped in the future (and one such item may fail the whole
        # request): refuse it here, naming the field. Timestamps are canonical UTC text,
        # so comparing text compares times; "now" is refreshed once a second.
        outside = self._window.outside
        if outside(payload["ts"]):  # required: the mapping never leaves it out
            return f"ts {payload['ts']} is in the future: m3ter refuses usage stamped later than now"
        ets = payload.get("ets")
        if ets is not None and outside(ets):
            return f"ets {ets} is in the future: m3ter refuses usage stamped later than now"
        return None

    # --- body ------------------------------------------------------------------------

    # --- auth ------------------------------------------------------------------------

    def _fetch_token(self) -> tuple[str, float]:
        key = self.config.get("m3ter_access_key_id", "")
        secret = self.config.get("m3ter_api_secret", "")
        basic = base64.b64encode(f"{key}:{secret}".encode()).decode()
        url = f"{self.auth_url}/oauth/token"
        headers = {"Authorization": f"Basic {basic}", "Content-Type": "application/json"}
        body = b'{"grant_type":"client_credentials"}'

        return self.credential_request(
            "POST",
            url,
            headers,
            body,
            setting="m3ter_access_key_id and m3ter_api_secret",
            credential="credentials",
            path="/oauth/token",
            refused=(400, 401, 403),
            read=_token_and_lifetime,
        )

    def _bearer(self) -> str:
        return self._token.get()

    def refresh_credentials(self, stale: OutgoingRequest) -> None:
        self._token.drop(stale.headers.get("Authorization", "").removeprefix("Bearer "))

    def journal_scope(self) -> str:
        return f"m3ter {self.org_id}"

    def check_credentials(self) -> None:
        self._bearer()

    def live_secrets(self) -> list[str]:
        token = self._token.current
        return [token] if token else []

    # --- requests --------------------------------------------------------------------

    def ingest_request(self, body: bytes) -> OutgoingRequest:
        headers = {"Authorization": f"Bearer {self._bearer()}", "Content-Type": "application/json"}
        return OutgoingRequest("POST", self.ingest_url + self.ingest_path, headers, body)

    def judge_refusal(self, response: t.Any) -> Ruling | None:
        status = response.status
        if status in (401, 403):
            # m3ter answers an expired or invalid token with 403 (also an oversize body,
            # which the sink never builds): renew the token once.
            return Ruling(Verdict.REAUTH, f"m3ter answered {status} ({response.text(200)})")
        if status in (400, 422):
            return Ruling(Verdict.REJECTED, _error_message(response))
        if status == 404:
            return Ruling(
                Verdict.FATAL,
                f"m3ter answered 404 for {self.ingest_path}: check m3ter_org_id and m3ter_ingest_url",
            )
        return None

    def judge_acknowledgement(self, response: Response) -> Ruling | None:
        result = json_document(response).get("result")
        if result != "accepted":
            return self.not_acknowledged(response, f"result is {result!r}, not 'accepted'")
        return None

    # --- read side: usage query totals, ingest validation failure events -------------

    read_back = "totals"

    def _read(self, method: str, path: str, body: t.Any = None) -> t.Any:
        url = f"{self.auth_url}/organizations/{self.org_id}{path}"
        headers = {"Authorization": f"Bearer {self._bearer()}"}
        return read_json(self, method, url, headers, body, setting="m3ter_access_key_id and m3ter_api_secret")

    def _pages(self, path: str, query: dict[str, str]) -> t.Iterator[dict]:
        token = None
        while True:
            params = {**query, "pageSize": "200", **({"nextToken": token} if token else {})}
            page = self._read("GET", f"{path}?{urllib.parse.urlencode(params)}") or {}
            yield from page.get("data") or []
            token = page.get("nextToken")
            if not token:
                return

    def _ids_by_code(self, kind: str, codes: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(codes), 100):
            chunk = ",".join(codes[start : start + 100])
            for entity in self._pages(f"/{kind}", {"codes": chunk}):
                found[str(entity.get("code"))] = str(entity.get("id"))
        return found

    def platform_totals(self, wanted: set[TotalKey], window: Window) -> dict[TotalKey, decimal.Decimal]:
        meters = self._ids_by_code("meters", sorted({meter for _c, meter, _d, _f in wanted}))
        accounts = self._ids_by_code("accounts", sorted({customer for customer, _m, _d, _f in wanted}))
        # journal fields are "measure.tokens", "cost.usd": m3ter names the data field by its code
        fields = {(meter, name.split(".", 1)[1]): name for _c, meter, _d, name in wanted if "." in name}
        aggregations = [
            {"meterId": meters[meter], "fieldCode": code, "fieldType": "MEASURE", "function": "SUM"}
            for meter, code in sorted(fields)
            if meter in meters
        ]
        if not aggregations or not accounts:
            return {}
        body = {
            "startDate": iso(window.start),
            "endDate": iso(window.end),
            "meterIds": sorted(set(meters.values())),
            "accountIds": sorted(accounts.values()),
            "aggregations": aggregations,
            "groups": [{"groupType": "ACCOUNT"}, {"groupType": "TIME", "frequency": "DAY"}],
            "limit": 20_000,
        }
        answer = self._read("POST", "/usage/query", body) or {}
        if answer.get("hasMoreData"):
            raise DeliveryError(
                "m3ter's usage query has more than 20,000 rows: reconcile fewer days (--since)"
            )
        totals: dict[TotalKey, decimal.Decimal] = {}
        for row in answer.get("data") or []:
            name = fields.get((str(row.get("meterCode")), str(row.get("fieldCode"))))
            if name is not None and row.get("value") is not None:
                key = (
                    str(row.get("accountCode")),
                    str(row["meterCode"]),
                    str(row.get("startDate"))[:10],
                    name,
                )
                totals[key] = decimal.Decimal(str(row["value"]))
        return totals

    def invalid_items(self, window: Window) -> dict[str, str]:
        invalid = {}
        for event in self._pages("/events", {"eventName": "ingest.validation.failure"}):
            data = (event.get("m3terEvent") or {}).get("eventData") or {}
            if data.get("uid") is not None:
                invalid[str(data["uid"])] = str(
                    data.get("message") or data.get("type") or "ingest validation failure"
                )
        return invalid

    def reauth_failed_message(self, status: int) -> str:
        return (
            f"m3ter refused a freshly issued token ({status}): check that the Service User has "
            f"measurements:upload permission on organization {self.org_id}"
        )


def _error_message(response: t.Any) -> str:
    try:
        document = json.loads(response.body)
    except ValueError:
        return response.text()
    if isinstance(document, dict):
        for key in ("message", "error", "errors"):
            if key in document:
                return str(document[key])[:500]
    return response.text()


def _token_and_lifetime(response: t.Any) -> tuple[str, float]:
    try:
        document = json.loads(response.body)
        return document["access_token"], float(document.get("expires_in", 18000))
    except (ValueError, KeyError, TypeError):
        raise RetryableFailure("m3ter POST /oauth/token: unreadable answer") from None
