"""What the shared test families need to know of each platform: one ``PlatformCase`` each.

Configuration (URLs, ids, limits, labels, the secret setting) is derived from the
``Destination`` class and the sandbox, which does not import the target. What a test
asserts (request sizes and paths of a dry run, the exit-3 line, where an item names its
customer) is written out here as a literal, so that a record stays a referee.
A new platform is one more entry in ``CASES``; ``test_platforms`` fails until it has one.
"""

from __future__ import annotations

import gzip
import json
import typing as t
from dataclasses import dataclass
from pathlib import Path

import requests

from target_usage_billing.destinations import DESTINATIONS, Destination
from target_usage_billing.sandbox import server
from target_usage_billing.sandbox.samples import singer_lines
from target_usage_billing.sandbox.state import VALIDATES_AFTER_ACK, SandboxSettings
from tests.helpers import EXAMPLES, Result, Sandbox, run_target

SANDBOX_DEFAULTS = SandboxSettings()


@dataclass(frozen=True)
class PlatformCase:
    destination: type[Destination]
    usage_rule: dict  # the usage rows' rule ({"id", "account", "at", "tokens", "note"}), time from "at"
    example_requests: tuple[str, tuple[int, ...]]  # dry run of the bundled example: path, items/request
    customer_path: str  # where a stored item names its customer (dotted)
    refused_key_message: str | None = None  # the exit-3 line for a wrong key (None: not tested)
    stamps_now: bool = True  # whether the "now" rule stamps "now_ts" (m3ter has no time window)
    crash_base_ago: int = 86400  # record 0's age in crash tests: yesterday, inside every window

    @property
    def name(self) -> str:
        return self.destination.name

    @property
    def label(self) -> str:
        return self.destination.label

    @property
    def id_field(self) -> str:
        return self.destination.journal_fields.id

    @property
    def event_field(self) -> str:
        """The field that names the meter or event type."""
        return self.destination.journal_fields.meter

    @property
    def time_field(self) -> str:
        return self.destination.journal_fields.time

    @property
    def max_items(self) -> int:
        return self.destination.max_items_per_request

    @property
    def envelope_key(self) -> str | None:
        return self.destination.envelope_key

    @property
    def ingest_path(self) -> str:
        return self.destination.ingest_path

    @property
    def content_type(self) -> str:
        return getattr(self.destination, "content_type", None) or "application/json"

    @property
    def secret_setting(self) -> str:
        """The one setting marked secret: what a dry run does without."""
        (name,) = [p.name for p in self.destination.settings if p.to_dict()[p.name].get("secret")]
        return name

    @property
    def secret(self) -> str:
        """The sandbox's default value of the secret setting."""
        return getattr(SANDBOX_DEFAULTS, self.secret_setting)

    @property
    def prefix(self) -> str:
        """Where the sandbox serves the platform ("" for the root)."""
        platform = server.PLATFORMS.get(self.name)
        return platform.PREFIX if platform else ""

    def url_settings(self, url: str) -> dict:
        """Settings sending every request of the platform to the sandbox at ``url``."""
        return {p.name: url + self.prefix for p in self.destination.settings if p.name.endswith("_url")}

    @property
    def note_field(self) -> str:
        """Where the usage rows' "note" lands in a stored item."""
        (field,) = [k for k, v in self.usage_rule["fields"].items() if isinstance(v, dict) and "note" in v]
        return field

    @property
    def usage_rule_now(self) -> dict:
        """The usage rule stamping "now_ts" (an hour ago) where the platform has a time window."""
        if not self.stamps_now:
            return self.usage_rule
        return {**self.usage_rule, "fields": {**self.usage_rule["fields"], self.time_field: "now_ts"}}

    @property
    def reads_by_id(self) -> bool:
        return self.destination.read_back == "ids"

    @property
    def validates_later(self) -> bool:
        """Whether the platform accepts first and reports invalid items later."""
        return self.name in VALIDATES_AFTER_ACK

    def customer(self, item: dict) -> t.Any:
        for key in self.customer_path.split("."):
            item = item[key]
        return item

    def config(self, sandbox: Sandbox, **overrides: t.Any) -> dict:
        return example_config(self.name, sandbox, **overrides)

    def config_for(self, sandbox: Sandbox, **overrides: t.Any) -> dict:
        return config_for(self.name, sandbox, **overrides)

    def post_items(
        self,
        sandbox: Sandbox,
        items: list[t.Any],
        *,
        key: str | None = None,
        query: str = "",
        content_type: str | None = None,
        compress: bool = False,
    ) -> requests.Response:
        """POST ``items`` to the sandbox's ingest endpoint as the platform's own API takes them."""
        body = json.dumps({self.envelope_key: items} if self.envelope_key else items).encode()
        headers = {
            "Authorization": f"Bearer {self.secret if key is None else key}",
            "Content-Type": content_type or self.content_type,
        }
        if compress:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        url = f"{sandbox.url}{self.prefix}{self.ingest_path}{query}"
        return requests.post(url, data=body, headers=headers, timeout=10)


def _rule(fields: dict) -> dict:
    return {"stream": "usage", "fields": fields}


CASES: dict[str, PlatformCase] = {
    case.name: case
    for case in (
        PlatformCase(
            DESTINATIONS["m3ter"],
            _rule(
                {
                    "meter": "'tokens'",
                    "account": "account",
                    "ts": "at",
                    "measure": {"tokens": "tokens"},
                    "metadata": {"note": "note"},
                }
            ),
            example_requests=("/organizations/demo-org/measurements", (300,)),
            customer_path="account",
            stamps_now=False,
        ),
        PlatformCase(
            DESTINATIONS["metronome"],
            _rule(
                {
                    "customer_id": "account",
                    "event_type": "'tokens'",
                    "timestamp": "at",
                    "properties": {"tokens": "tokens", "note": "note"},
                }
            ),
            example_requests=("/v1/ingest", (100, 100, 100, 100)),
            customer_path="customer_id",
        ),
        PlatformCase(
            DESTINATIONS["orb"],
            _rule(
                {
                    "external_customer_id": "account",
                    "event_name": "'tokens'",
                    "timestamp": "at",
                    "properties": {"tokens": "tokens", "note": "note"},
                }
            ),
            example_requests=("/v1/ingest", (400,)),
            customer_path="external_customer_id",
            refused_key_message="Orb refused the API key (401 from GET /orb/v1/customers): check orb_api_key",
            crash_base_ago=3 * 3600,  # inside Orb's 12-hour grace period
        ),
        PlatformCase(
            DESTINATIONS["lago"],
            _rule(
                {
                    "external_subscription_id": "account",
                    "code": "'tokens'",
                    "timestamp": "at",
                    "properties": {"tokens": "tokens", "note": "note"},
                }
            ),
            example_requests=("/api/v1/events/batch", (100, 100, 100, 100)),
            customer_path="external_subscription_id",
            refused_key_message="Lago refused the API key (401 from GET /lago/api/v1/customers): "
            "check lago_api_key",
        ),
        PlatformCase(
            DESTINATIONS["openmeter"],
            _rule(
                {
                    "subject": "account",
                    "type": "'tokens'",
                    "time": "at",
                    "data": {"tokens": "tokens", "note": "note"},
                }
            ),
            example_requests=("/api/v1/events", (400,)),
            customer_path="subject",
            refused_key_message="OpenMeter refused the API token (401 from GET /openmeter/api/v1/meters): "
            "check openmeter_api_token",
        ),
        PlatformCase(
            DESTINATIONS["stripe"],
            _rule(
                {
                    "event_name": "'tokens'",
                    "timestamp": "at",
                    "payload": {"stripe_customer_id": "account", "value": "tokens", "note": "note"},
                }
            ),
            example_requests=("/v2/billing/meter_event_stream", (100, 100, 100)),
            customer_path="payload.stripe_customer_id",
            refused_key_message="Stripe refused the secret key "
            "(401 from POST /v2/billing/meter_event_session): check stripe_api_key",
        ),
    )
}
DESTINATIONS_UNDER_TEST = list(CASES)


def example_config(destination: str, sandbox: Sandbox, **overrides: t.Any) -> dict:
    """``examples/<destination>-segment.config.json`` pointed at the sandbox."""
    config = json.loads((EXAMPLES / f"{destination}-segment.config.json").read_text())
    config.update(
        CASES[destination].url_settings(sandbox.url), max_retry_seconds=30, progress_interval_seconds=0
    )
    config.pop("dead_letter_path", None)
    config.pop("orb_grace_period_hours", None)  # the sandbox keeps Orb's default, 12 h
    config.update(overrides)
    return config


def config_for(destination: str, sandbox: Sandbox, **overrides: t.Any) -> dict:
    """The example config of ``destination`` with the usage-row rule and ``overrides``."""
    return example_config(destination, sandbox, **{"mappings": [CASES[destination].usage_rule], **overrides})


def crash_config(sandbox, destination: str = "m3ter", **overrides) -> dict:
    settings = {
        "batch_size_rows": 50,
        "max_requests_in_flight": 3,
        "state_checkpoint_seconds": 0.1,
        **overrides,
    }
    return config_for(destination, sandbox, **settings)


def load_segment_tracks(
    sandbox: Sandbox, tmp_path: Path, destination: str, config: dict, seed: int
) -> tuple[Result, list[tuple[dict, dict]]]:
    """Run the target on 300 generated Segment events (6 hours, a STATE every 100) and
    check that every track call, and nothing else, was stored once under its messageId.
    Gives the run's result and each (record, item stored) pair."""
    lines = list(singer_lines(300, seed=seed, hours=6, state_every=100))
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line)["record"] for line in lines if '"RECORD"' in line]
    tracks = {r["messageId"]: r for r in records if r["type"] == "track"}
    stored = {item[CASES[destination].id_field]: item for item in sandbox.items(destination)}
    assert set(stored) == set(tracks)
    return result, [(tracks[key], item) for key, item in stored.items()]


# --- short names for what many files use (values, not tables a new platform extends) ------

USAGE_RULE_M3TER = CASES["m3ter"].usage_rule
M3TER_KEY = SANDBOX_DEFAULTS.m3ter_access_key_id
M3TER_SECRET = CASES["m3ter"].secret
METRONOME_TOKEN = CASES["metronome"].secret
ORB_KEY = CASES["orb"].secret
LAGO_KEY = CASES["lago"].secret
OPENMETER_TOKEN = CASES["openmeter"].secret
STRIPE_KEY = CASES["stripe"].secret


def m3ter_config(sandbox: Sandbox, **overrides: t.Any) -> dict:
    return example_config("m3ter", sandbox, **overrides)


def metronome_config(sandbox: Sandbox, **overrides: t.Any) -> dict:
    return example_config("metronome", sandbox, **overrides)


def usage_config(sandbox, **overrides):
    return m3ter_config(sandbox, mappings=[USAGE_RULE_M3TER], **overrides)
