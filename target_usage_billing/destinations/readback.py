"""What a platform says it holds: the read side ``--reconcile`` asks, per destination.

A platform is read back one of two ways, whichever its API allows:
- by id (Metronome, Orb, Lago, OpenMeter): the journal's sampled ids are looked up, each
  found, missing, or invalid with the platform's reason;
- by totals (m3ter, Stripe): sums per customer, meter and day against the journal's.
Platforms that validate after acknowledging also list what they found invalid
(``invalid_items``), whatever was sampled.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import typing as t
import urllib.parse
from dataclasses import dataclass

from target_usage_billing.errors import CredentialsError, DeliveryError
from target_usage_billing.retry import retryable_status

if t.TYPE_CHECKING:
    from target_usage_billing.destinations.base import Destination

# (customer, meter, day "YYYY-MM-DD", field) -> exact total
TotalKey = tuple[str, str, str, str]


@dataclass(frozen=True)
class ItemCheck:
    """One sampled id as the platform holds it."""

    found: bool
    problem: str | None = None  # found but not billed: the platform's own reason


@dataclass(frozen=True)
class Window:
    """The days reconciled: [first, last], each "YYYY-MM-DD" (UTC)."""

    first: str
    last: str

    @property
    def start(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.first).replace(tzinfo=dt.timezone.utc)

    @property
    def end(self) -> dt.datetime:
        """The first moment after the window."""
        return dt.datetime.fromisoformat(self.last).replace(tzinfo=dt.timezone.utc) + dt.timedelta(days=1)


def day_start(day: str) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(tzinfo=dt.timezone.utc)


def iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def read_json(
    destination: Destination,
    method: str,
    url: str,
    headers: dict[str, str],
    body: t.Any = None,
    *,
    setting: str,
    missing_ok: bool = False,
) -> t.Any:
    """One read request, retried while transient; its JSON answer with exact decimals.

    401/403 are CredentialsError naming ``setting``; 404 is None when ``missing_ok``;
    anything else that is not a JSON 2xx is a DeliveryError naming what came back.
    """
    path = urllib.parse.urlsplit(url).path
    what = f"{destination.label} {method} {path}"
    data = None if body is None else json.dumps(body).encode()
    sent = {**headers, "Accept": "application/json"}
    if data is not None:
        sent["Content-Type"] = "application/json"

    def attempt() -> t.Any:
        response = destination.transport.send_once(method, url, sent, data)
        retry = retryable_status(response, what)
        if retry is not None:
            raise retry
        if response.status in (401, 403):
            refused = f"{destination.label} refused the credentials ({response.status} from {what})"
            raise CredentialsError(f"{refused}: check {setting}")
        if response.status == 404 and missing_ok:
            return None
        if not 200 <= response.status < 300:
            raise DeliveryError(f"{what} answered {response.status}: {response.text(300)}")
        try:
            return json.loads(response.body, parse_float=decimal.Decimal)
        except ValueError:
            raise DeliveryError(f"{what}: the answer is not JSON ({response.text(120)!r})") from None

    return destination.transport.with_retries(attempt, what)
