"""What a billing destination declares: fields, limits, envelope, auth and answer handling.

A destination is one small module. The sink, the mapping engine and the delivery
pipeline only use this interface, so Orb, Lago, OpenMeter or Stripe are one more module.
"""

from __future__ import annotations

import abc
import enum
import typing as t
from collections.abc import Sequence
from dataclasses import dataclass

from singer_sdk import typing as th

from target_usage_billing.http import HttpTransport, Response
from target_usage_billing.mapping import FieldSpec, Preset


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    RETRY = "retry"  # transient: same body again after a wait
    REAUTH = "reauth"  # credentials went stale: refresh once, resend
    REJECTED = "rejected"  # the content was refused: isolate the bad items
    FATAL = "fatal"  # nothing sent again will help (bad credentials, unknown answer)


@dataclass(frozen=True)
class Answer:
    verdict: Verdict
    message: str = ""


@dataclass(frozen=True)
class OutgoingRequest:
    method: str
    url: str
    path: str  # for logs and dry-run files: no host, no secrets
    headers: dict[str, str]
    body: bytes


class Destination(abc.ABC):
    """One billing platform's ingest contract."""

    name: t.ClassVar[str]
    label: t.ClassVar[str]
    item_noun: t.ClassVar[str] = "items"
    ingest_path: str  # the ingest endpoint's path, shown in logs and dry-run files
    # Hard caps of the API: never exceeded whatever is configured.
    max_items_per_request: t.ClassVar[int]
    max_body_bytes: t.ClassVar[int]
    # Published request-rate limits as (requests, per seconds): the client default.
    rate_limits: t.ClassVar[tuple[tuple[int, float], ...]] = ()
    presets: t.ClassVar[dict[str, Preset]] = {}
    # Settings of this destination, prefixed with its name (e.g. m3ter_org_id).
    settings: t.ClassVar[list[th.Property]] = []

    def __init__(self, config: t.Mapping[str, t.Any], transport: HttpTransport):
        self.config = config
        self.transport = transport

    # --- configuration ---------------------------------------------------------------

    @classmethod
    def config_errors(cls, config: t.Mapping[str, t.Any], *, dry_run: bool) -> list[str]:
        """Problems with this destination's settings, each one line."""
        return []

    @classmethod
    @abc.abstractmethod
    def field_specs(cls, config: t.Mapping[str, t.Any]) -> list[FieldSpec]:
        """The payload fields a mapping rule may give."""

    @classmethod
    def secrets(cls, config: t.Mapping[str, t.Any]) -> list[str]:
        """Secret values that must never appear in output (settings marked secret)."""
        names = [p.name for p in cls.settings if p.to_dict()[p.name].get("secret")]
        return [str(config[n]) for n in names if config.get(n)]

    def live_secrets(self) -> list[str]:
        """Secrets obtained while running (e.g. an access token), to keep out of logs."""
        return []

    # --- payloads --------------------------------------------------------------------

    def validate_payload(self, payload: dict[str, t.Any]) -> str | None:
        """A reason to refuse a mapped payload locally (it would fail the request)."""
        return None

    @property
    @abc.abstractmethod
    def envelope_overhead(self) -> int:
        """Bytes the envelope adds around the comma-separated items."""

    @abc.abstractmethod
    def envelope(self, items: Sequence[bytes]) -> bytes:
        """The request body carrying ``items`` (already-encoded JSON objects)."""

    # --- requests --------------------------------------------------------------------

    @abc.abstractmethod
    def ingest_request(self, body: bytes) -> OutgoingRequest:
        """The ingest request for ``body``, authenticated."""

    @abc.abstractmethod
    def judge(self, response: Response) -> Answer:
        """What an ingest answer means."""

    def refresh_credentials(self, stale: OutgoingRequest) -> None:  # noqa: B027 - optional hook
        """Drop cached credentials after a REAUTH answer to ``stale`` (e.g. an OAuth token)."""

    def reauth_failed_message(self) -> str:
        return f"{self.label} refused the credentials again after renewing them"

    @abc.abstractmethod
    def check_credentials(self) -> None:
        """Fail fast with CredentialsError before any input is read."""
