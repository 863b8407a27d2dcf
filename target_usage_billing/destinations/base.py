"""What a billing destination declares: fields, limits, envelope, auth and answer handling.

A destination is one small module. The sink, the mapping engine and the delivery
pipeline only use this interface, so Orb, Lago, OpenMeter or Stripe are one more module.
"""

from __future__ import annotations

import abc
import datetime as dt
import decimal
import enum
import re
import time
import typing as t
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
from singer_sdk import typing as th

from target_usage_billing.destinations.readback import ItemCheck, TotalKey, Window
from target_usage_billing.errors import CredentialsError, DeliveryError
from target_usage_billing.http import HttpTransport, Response
from target_usage_billing.journal import JournalFields
from target_usage_billing.mapping import FieldSpec, Preset
from target_usage_billing.retry import retryable_status, should_retry

_T = t.TypeVar("_T")
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")


class TimeWindow:
    """The times a platform accepts, as canonical UTC text ("YYYY-MM-DDTHH:MM:SS").

    Payload timestamps are canonical UTC text (mapping makes them so), so comparing them
    as text with these bounds compares times, for a string comparison a record instead
    of parsing a datetime. The bounds are worked out once a second and kept a second
    inside the platform's window, so that nothing sent falls outside it.
    """

    def __init__(self, behind: dt.timedelta | None, ahead: dt.timedelta):
        self._behind = behind.total_seconds() - 1 if behind is not None else None
        self._ahead = ahead.total_seconds() - 1
        self._refresh_at = 0.0
        self._oldest = ""  # empty: no lower bound
        # The latest second accepted, followed by a character above any a stamp holds
        # after its seconds ("." or "Z"): a stamp is later than that second exactly when
        # it sorts after this, and earlier than the oldest second when it sorts before it.
        self._after_latest = ""

    def outside(self, stamp: str) -> str | None:
        """ "past" or "future" when canonical ``stamp`` falls outside the window, else None."""
        now = time.time()
        if now >= self._refresh_at:
            self._after_latest = time.strftime("%Y-%m-%dT%H:%M:%S\x7f", time.gmtime(now + self._ahead))
            if self._behind is not None:
                self._oldest = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - self._behind))
            self._refresh_at = now + 1
        if stamp > self._after_latest:
            return "future"
        if stamp < self._oldest:
            return "past"
        return None


class OutsideWindow(str):
    """A ``validate_payload`` reason saying the usage is outside the platform's time window
    (the run counts these per stream and says where they went)."""


class Verdict(enum.Enum):
    """What delivery does with an answer (``Destination.judge`` decides which)."""

    ACCEPTED = "accepted"
    RETRY = "retry"  # transient: same body again after a wait
    REAUTH = "reauth"  # credentials went stale: refresh once, resend
    REJECTED = "rejected"  # the content was refused: isolate the bad items
    # every item refused is one the platform already stored (a re-send after a crash, on
    # a platform that refuses duplicates instead of ignoring them): a single one is done
    ALREADY_STORED = "already stored"
    DENIED = "denied"  # the credentials were refused: exit 3, nothing sent again will help
    FATAL = "fatal"  # nothing sent again will help (unknown answer, wrong URL)


@dataclass(frozen=True)
class Ruling:
    """A destination's reading of one HTTP response: what to do, and why (for logs)."""

    verdict: Verdict
    message: str = ""
    # positions in the request of items the platform says it already has (Lago names
    # them by index): dropped as already stored, the rest sent again once
    stored: tuple[int, ...] = ()


ACCEPTED = Ruling(Verdict.ACCEPTED)


@dataclass(frozen=True)
class Acknowledgement:
    """What a platform's own success answer to an ingest request looks like.

    Taken from the official SDK's response type. A 2xx that does not look like this came
    from something else (a proxy, a gateway, a captive portal) and is not a delivery.
    """

    statuses: tuple[int, ...] = (200,)
    # "object": a JSON object with a JSON content type; "empty": no body at all;
    # "empty or object": either (an SDK that casts the answer to None)
    body: t.Literal["object", "empty", "empty or object"] = "object"
    # keys the object always holds as JSON arrays (Lago's "events"): a gateway's own JSON lacks them
    lists: tuple[str, ...] = ()

    def problem(self, response: Response) -> str | None:
        """Why ``response`` (a 2xx) is not this acknowledgement, or None when it is."""
        if response.status not in self.statuses:
            expected = " or ".join(str(s) for s in self.statuses)
            return f"status {response.status}, where the platform answers {expected}"
        if not response.body:
            return None if self.body != "object" else "an empty body, where the platform answers JSON"
        if self.body == "empty":
            return "a body, where the platform answers with none"
        content_type = response.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            return f"Content-Type {content_type or 'none'!r}, where the platform answers application/json"
        document = json_document(response)
        if not isinstance(document, dict):
            return "a body that is not a JSON object"
        for key in ("error", "errors"):
            if document.get(key):  # a gateway's error dressed as a success
                return f"a body reporting {key}"
        for key in self.lists:
            if not isinstance(document.get(key), list):
                return f"a JSON object without its {key!r} list"
        return None


def describe_answer(response: Response) -> str:
    """The answer as a log line may show it: status, content type and its first bytes."""
    content_type = response.headers.get("content-type") or "none"
    return f"{response.status}, Content-Type {content_type!r}, body {response.text(120)!r}"


def json_document(response: Response) -> t.Any:
    """The answer's body as JSON, or None when it is not JSON."""
    try:
        return msgspec.json.decode(response.body)
    except msgspec.DecodeError:
        return None


@dataclass(frozen=True)
class OutgoingRequest:
    """One authenticated ingest request, ready for the transport."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes


class Destination(abc.ABC):
    """One billing platform's ingest contract: the only thing a new platform writes.

    A subclass declares, as class attributes, its ``name`` (the ``destination`` setting),
    ``label`` and ``item_noun`` for messages, ``ingest_path``, its hard limits
    (``max_items_per_request``, ``max_body_bytes``, ``rate_limits``), its ``presets`` and
    its ``settings`` (named after it, e.g. ``m3ter_org_id``; ``required_settings`` those a
    real run needs) and ``envelope_key`` (``{"events": [...]}``; None: a bare array). It
    implements:

    - ``field_specs``: the payload fields a rule may map, each with its kind (the mapping
      converts values to that kind; one ``FieldKind.ID`` field is the idempotency key);
    - ``ingest_request``: the authenticated request for a body;
    - ``judge_refusal``: what the platform's error answers mean (see ``judge``);
    - ``check_credentials``: a cheap authenticated call before any input is read;
    and may override ``validate_payload`` (refuse locally what the API would refuse,
    e.g. a time outside its window), ``config_errors``, ``live_secrets`` and
    ``refresh_credentials`` (tokens that expire). Register it in
    ``destinations/__init__.py`` and teach the sandbox its contract.
    """

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
    # Those a real (not dry) run cannot do without.
    required_settings: t.ClassVar[tuple[str, ...]] = ()
    # The body is {"<envelope_key>": [item, ...]}, or a bare array when None.
    envelope_key: t.ClassVar[str | None] = None
    # The platform's own success answer (see Acknowledgement): nothing else is a delivery.
    acknowledgement: t.ClassVar[Acknowledgement]
    # The setting holding the ingest URL, named when an answer is not the platform's.
    url_setting: t.ClassVar[str]
    # Where a payload keeps its id, customer, meter, time and numbers (the run journal).
    journal_fields: t.ClassVar[JournalFields]
    # How long the platform de-duplicates an id after it first received it (None: for as
    # long as it keeps the item, or unknown); a re-send after that bills it again.
    dedup_window: t.ClassVar[dt.timedelta | None] = None
    # How far back the platform takes usage at all (None: no limit published).
    max_age: t.ClassVar[dt.timedelta | None] = None

    def __init__(self, config: t.Mapping[str, t.Any], transport: HttpTransport):
        self.config = config
        self.transport = transport

    # --- configuration ---------------------------------------------------------------

    @classmethod
    def config_errors(cls, config: t.Mapping[str, t.Any], *, dry_run: bool) -> list[str]:
        """Problems with this destination's settings, each one line (no secret shown).

        The base checks what holds for every platform: ``*_url`` settings are http(s)
        URLs with a host; ids, keys and tokens have no spaces or control characters (they
        go into URLs and headers). Subclasses add theirs.
        """
        problems = []
        for prop in cls.settings:
            value = config.get(prop.name)
            if not isinstance(value, str) or not value:
                continue
            if prop.name.endswith("_url"):
                parts = urllib.parse.urlsplit(value)
                if parts.scheme not in ("http", "https") or not parts.hostname or _UNSAFE.search(value):
                    problems.append(
                        f"{prop.name}: {value[:200]!r} is not an http:// or https:// URL with a host"
                    )
            elif _UNSAFE.search(value):
                problems.append(f"{prop.name}: must not contain spaces or control characters")
        missing = [name for name in cls.required_settings if not config.get(name)]
        if missing and not dry_run:
            problems.append(f"destination {cls.name} needs {', '.join(missing)} (or turn on dry_run)")
        return problems

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

    def journal_scope(self) -> str:
        """The platform account the journal files acknowledged usage under."""
        return f"{self.name} {self.config.get(self.url_setting) or ''}".strip()

    def journal_layout(self) -> JournalFields:
        """``journal_fields``, for platforms whose layout depends on settings (Stripe)."""
        return self.journal_fields

    # --- read side (--reconcile, see readback.py) ------------------------------------

    # "ids": sampled ids looked up (check_items); "totals": sums compared (platform_totals)
    read_back: t.ClassVar[str] = "ids"
    # ids a read may look up at once, and the days back the platform lets one search
    read_batch: t.ClassVar[int] = 100
    read_days: t.ClassVar[int | None] = None

    def check_items(self, ids: list[str], window: Window) -> dict[str, ItemCheck]:
        """What the platform holds of each id (absent: not found)."""
        raise NotImplementedError

    def platform_totals(self, wanted: set[TotalKey], window: Window) -> dict[TotalKey, decimal.Decimal]:
        """The platform's totals for the journal's (customer, meter, day, field) keys."""
        raise NotImplementedError

    def hourly_volume(self, window: Window) -> dict[str, int] | None:
        """Events the platform holds per UTC hour ("YYYY-MM-DDTHH") of their time, the
        account's whole volume (other senders' too), for platforms that publish it (Orb);
        None: no such read. It finds losses outside the sampled ids."""
        return None

    def invalid_items(self, window: Window) -> dict[str, str]:
        """Ids the platform accepted, then reported invalid through its own channel, with
        its reason (platforms that validate after acknowledging)."""
        return {}

    # --- payloads --------------------------------------------------------------------

    def validate_payload(self, payload: dict[str, t.Any]) -> str | None:
        """A reason to refuse a mapped payload locally (it would fail the request)."""
        return None

    @property
    def envelope_overhead(self) -> int:
        """Bytes the envelope adds around the comma-separated items."""
        return len(self._envelope_head) + len(self._envelope_tail)

    def envelope(self, items: Sequence[bytes]) -> bytes:
        """The request body carrying ``items`` (already-encoded JSON objects)."""
        return self._envelope_head + b",".join(items) + self._envelope_tail

    @property
    def _envelope_head(self) -> bytes:
        key = self.envelope_key
        return b'{"' + key.encode() + b'":[' if key else b"["

    @property
    def _envelope_tail(self) -> bytes:
        return b"]}" if self.envelope_key else b"]"

    # --- channels: items that must go another way than the live ingest (Orb backfills) --

    channel_noun: t.ClassVar[str] = "channels"  # what the summary calls them
    uses_channels = False  # whether delivery asks ``channels`` about each batch

    def channels(self, bodies: Sequence[bytes]) -> list[tuple[str | None, list[int]]] | None:
        """How a batch splits by the way its items must go: (channel, positions), None as
        the channel of the live ingest; None when the whole batch goes live (the usual)."""
        return None

    def channel_request(self, body: bytes, channel: str) -> OutgoingRequest:
        """The ingest request of ``body`` in ``channel``."""
        raise NotImplementedError

    def channel_acknowledged(self, channel: str, count: int) -> None:  # noqa: B027 - optional hook
        """``count`` items were acknowledged in ``channel``."""

    def settle_channels(self, succeeded: bool) -> None:  # noqa: B027 - optional hook
        """End of the run: make what the channels took count (``succeeded``: everything
        received was delivered), or undo it. Raises when that fails."""

    def channel_summary(self) -> list[str]:
        """Summary lines about the channels."""
        return []

    # --- requests --------------------------------------------------------------------

    @abc.abstractmethod
    def ingest_request(self, body: bytes) -> OutgoingRequest:
        """The ingest request for ``body``, authenticated."""

    def judge(self, response: Response) -> Ruling:
        """What an ingest answer means: a small pure decision, in this order.

        2xx: accepted only when it is the platform's own acknowledgement (see
        ``acknowledgement`` and ``judge_acknowledgement``), else retried and in the end a
        failure naming what came back; a redirect is fatal and names its Location;
        ``x-should-retry: true`` from the server, retry; then the platform's own reading
        of refusals (``judge_refusal``); then transient statuses (408, 409, 429, 5xx,
        unless ``x-should-retry: false``), retry; anything else fatal.
        """
        status = response.status
        if 200 <= status < 300:
            problem = self.acknowledgement.problem(response)
            if problem is not None:
                return self.not_acknowledged(response, problem)
            return self.judge_acknowledgement(response) or ACCEPTED
        if 300 <= status < 400:
            location = response.headers.get("location") or "nowhere"
            return Ruling(
                Verdict.FATAL,
                f"{self.label} POST {self.ingest_path} answered {status}, a redirect to "
                f"{location[:200]!r}: ingest requests are never redirected; check {self.url_setting} "
                "(the API's own URL, not a web page or a proxy's login page)",
            )
        retry = should_retry(status, response.headers)
        if retry.retry and retry.by_server:
            return Ruling(Verdict.RETRY, f"{self.label} answered {status} (x-should-retry: true)")
        ruling = self.judge_refusal(response)
        if ruling is not None:
            return ruling
        if retry.retry:
            return Ruling(Verdict.RETRY, f"{self.label} answered {status}")
        if status == 413:  # often a proxy's cap in front of a self-hosted platform
            msg = (
                f"{self.label} answered 413 (request body too large): the platform, or a proxy "
                "in front of it, takes smaller requests; lower batch_max_bytes (or batch_size_rows)"
            )
            return Ruling(Verdict.FATAL, msg)
        return Ruling(Verdict.FATAL, f"{self.label} answered {status}: {response.text()}")

    def judge_acknowledgement(self, response: Response) -> Ruling | None:
        """The platform's reading of the body of its own success answer: None when it
        acknowledges every item, else a Ruling (e.g. Orb's ``validation_failed``)."""
        return None

    def not_acknowledged(self, response: Response, problem: str) -> Ruling:
        """A 2xx that is not the platform's acknowledgement: retried, never a delivery."""
        return Ruling(
            Verdict.RETRY,
            f"{self.label} POST {self.ingest_path}: the answer is not {self.label}'s "
            f"acknowledgement ({problem}; got {describe_answer(response)}), so nothing counts as "
            f"delivered: a proxy, gateway or captive portal may be answering instead of {self.label}; "
            f"check {self.url_setting} and the HTTPS_PROXY/ALL_PROXY variables",
        )

    @abc.abstractmethod
    def judge_refusal(self, response: Response) -> Ruling | None:
        """The platform's meaning of an error answer (REAUTH, DENIED, REJECTED, FATAL), or
        None to let the generic rules decide."""

    def refresh_credentials(self, stale: OutgoingRequest) -> None:  # noqa: B027 - optional hook
        """Drop cached credentials after a REAUTH answer to ``stale`` (e.g. an OAuth token)."""

    # Whether renewing the credentials checks them: a Stripe meter event session is made
    # with the secret key itself, which is refused then if it is wrong; a REAUTH answer on
    # ingest only ever means that the session expired, however soon after the last.
    renewal_checks_credentials: t.ClassVar[bool] = False

    def reauth_failed_message(self, status: int) -> str:
        """The error when credentials are refused again right after renewing them."""
        return f"{self.label} refused the credentials again ({status}) after renewing them"

    @abc.abstractmethod
    def check_credentials(self) -> None:
        """Fail fast with CredentialsError before any input is read."""

    def probe_credentials(
        self, url: str, headers: dict[str, str], setting: str, credential: str = "API key"
    ) -> None:
        """``check_credentials`` for a static key: one cheap authenticated GET."""
        self.credential_request("GET", url, headers, None, setting=setting, credential=credential)

    def credential_request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        *,
        setting: str,
        credential: str,
        path: str | None = None,
        refused: tuple[int, ...] = (401, 403),
        read: t.Callable[[Response], _T] = lambda response: None,  # type: ignore[assignment,return-value]
    ) -> _T:
        """A request that checks or obtains credentials, retried while transient: a
        ``refused`` status is CredentialsError naming ``setting``, another non-2xx answer
        a DeliveryError (e.g. a wrong URL); ``read`` takes what is needed from the 2xx
        answer (raising RetryableFailure when it cannot). ``path``: the endpoint as
        messages name it (default: the URL's path)."""
        request = f"{method} {path or urllib.parse.urlsplit(url).path}"
        what = f"{self.label} {request}"

        def attempt() -> _T:
            response = self.transport.send_once(method, url, headers, body)
            retry = retryable_status(response, what)
            if retry is not None:
                raise retry
            if response.status in refused:
                msg = (
                    f"{self.label} refused the {credential} ({response.status} from {request}): "
                    f"check {setting}"
                )
                raise CredentialsError(msg)
            if not 200 <= response.status < 300:
                raise DeliveryError(f"{what} answered {response.status}: {response.text()}")
            return read(response)

        return self.transport.with_retries(attempt, what)


class BearerKeyDestination(Destination):
    """A platform reached with one static Bearer key (Metronome, Orb, Lago, OpenMeter):
    its headers, the ingest request, the credentials probe and the usual refusals (401
    and 403: the key; 400 and 422: the content) come from a few class attributes."""

    key_setting: t.ClassVar[str]  # e.g. "orb_api_key"
    default_url: t.ClassVar[str]
    probe_path: t.ClassVar[str]  # a cheap authenticated GET, before any input is read
    credential: t.ClassVar[str] = "API key"  # what the key is called in messages
    content_type: t.ClassVar[str] = "application/json"

    def __init__(self, config: t.Mapping[str, t.Any], transport: HttpTransport):
        super().__init__(config, transport)
        self.api_url = str(config.get(self.url_setting) or self.default_url).rstrip("/")

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        key = self.config.get(self.key_setting)
        if key:  # none: a dry run, or a self-hosted OpenMeter
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def ingest_request(self, body: bytes) -> OutgoingRequest:
        """POST ``body`` to the ingest path with the Bearer key."""
        return OutgoingRequest("POST", f"{self.api_url}{self.ingest_path}", self._headers(), body)

    def judge_refusal(self, response: Response) -> Ruling | None:
        """401 and 403: the key was refused (DENIED); 400 and 422: the content (REJECTED)."""
        status = response.status
        if status in (401, 403):
            return Ruling(
                Verdict.DENIED,
                f"{self.label} refused the {self.credential} ({status} from POST {self.ingest_path}): "
                f"check {self.key_setting}",
            )
        if status in (400, 422):
            return Ruling(
                Verdict.REJECTED, f"{self.label} answered {status}: {self.refusal_detail(response)}"[:1000]
            )
        return None

    def refusal_detail(self, response: Response) -> str:
        """What the platform said of refused content, on one line (its body by default)."""
        return response.text()

    def check_credentials(self) -> None:
        """One authenticated GET of ``probe_path``."""
        url = f"{self.api_url}{self.probe_path}"
        self.probe_credentials(url, self._headers(), self.key_setting, credential=self.credential)
