"""Fixtures: the real sandbox and the real CLI, as subprocesses on loopback."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import types
import typing as t
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import typing_extensions

from target_usage_billing.sandbox.launch import launch
from target_usage_billing.sandbox.samples import singer_lines

BIN = Path(sys.executable).parent
TARGET = str(BIN / "target-usage-billing")
SANDBOX = str(BIN / "usage-billing-sandbox")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# A rule for simple usage rows: {"id", "account", "at" (epoch), "tokens", "note"}.
USAGE_RULE_M3TER = {
    "stream": "usage",
    "fields": {
        "meter": "'tokens'",
        "account": "account",
        "ts": "at",
        "measure": {"tokens": "tokens"},
        "metadata": {"note": "note"},
    },
}

M3TER_KEY = "sandbox-access-key"
M3TER_SECRET = "sandbox-api-secret"
METRONOME_TOKEN = "sandbox-metronome-token"
ORB_KEY = "sandbox-orb-key"
LAGO_KEY = "sandbox-lago-key"
OPENMETER_TOKEN = "sandbox-openmeter-token"
STRIPE_KEY = "sk_test_sandbox"


class Sandbox:
    def __init__(self, process: subprocess.Popen, url: str, data_dir: Path):
        self.process = process
        self.url = url
        self.data_dir = data_dir

    def stats(self, destination: str | None = None) -> dict:
        document = requests.get(f"{self.url}/_sandbox/stats", timeout=10).json()
        return document[destination] if destination else document

    def items(self, destination: str) -> list[dict]:
        answer = requests.get(f"{self.url}/_sandbox/items/{destination}", timeout=30)
        return [json.loads(line) for line in answer.content.splitlines() if line.strip()]

    def raw_items(self, destination: str) -> list[bytes]:
        answer = requests.get(f"{self.url}/_sandbox/items/{destination}", timeout=30)
        return [line for line in answer.content.splitlines() if line.strip()]

    def faults(self, *faults: dict, **settings: t.Any) -> None:
        answer = requests.post(
            f"{self.url}/_sandbox/faults", json={"faults": list(faults), **settings}, timeout=10
        )
        answer.raise_for_status()

    def expire_tokens(self) -> None:
        requests.post(f"{self.url}/_sandbox/expire-tokens", timeout=10).raise_for_status()

    def reset(self) -> None:
        requests.post(f"{self.url}/_sandbox/reset", timeout=10).raise_for_status()


def start_sandbox(tmp: Path, *args: str) -> Sandbox:
    launched = launch(tmp, *args)
    return Sandbox(launched.process, launched.url, launched.data_dir)


def stop_sandbox(sandbox: Sandbox) -> None:
    sandbox.process.send_signal(signal.SIGTERM)
    try:
        sandbox.process.wait(10)
    except subprocess.TimeoutExpired:
        sandbox.process.kill()


@pytest.fixture(scope="session")
def sandbox_session(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Sandbox]:
    sandbox = start_sandbox(tmp_path_factory.mktemp("sandbox"))
    yield sandbox
    stop_sandbox(sandbox)


@pytest.fixture
def sandbox(sandbox_session: Sandbox) -> Sandbox:
    """The shared sandbox, emptied (items, stats, faults, tokens) for each test."""
    sandbox_session.reset()
    return sandbox_session


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def states(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if "error:" in line]


# Settings pointing each destination's example config at the sandbox.
SANDBOX_URLS: dict[str, t.Callable[[str], dict]] = {
    "m3ter": lambda url: {"m3ter_ingest_url": url, "m3ter_auth_url": url},
    "metronome": lambda url: {"metronome_api_url": url},
    "orb": lambda url: {"orb_api_url": f"{url}/orb"},
    "lago": lambda url: {"lago_api_url": f"{url}/lago"},
    "openmeter": lambda url: {"openmeter_api_url": f"{url}/openmeter"},
    "stripe": lambda url: {"stripe_api_url": f"{url}/stripe", "stripe_meter_events_url": f"{url}/stripe"},
}


def example_config(destination: str, sandbox: Sandbox, **overrides: t.Any) -> dict:
    """``examples/<destination>-segment.config.json`` pointed at the sandbox."""
    config = json.loads((EXAMPLES / f"{destination}-segment.config.json").read_text())
    config.update(SANDBOX_URLS[destination](sandbox.url), max_retry_seconds=30, progress_interval_seconds=0)
    config.pop("dead_letter_path", None)
    config.pop("orb_grace_period_hours", None)  # the sandbox keeps Orb's default, 12 h
    config.update(overrides)
    return config


def m3ter_config(sandbox: Sandbox, **overrides: t.Any) -> dict:
    return example_config("m3ter", sandbox, **overrides)


def metronome_config(sandbox: Sandbox, **overrides: t.Any) -> dict:
    return example_config("metronome", sandbox, **overrides)


def orb_config(sandbox: Sandbox, **overrides: t.Any) -> dict:
    return example_config("orb", sandbox, **overrides)


def lago_config(sandbox: Sandbox, **overrides: t.Any) -> dict:
    return example_config("lago", sandbox, **overrides)


def openmeter_config(sandbox: Sandbox, **overrides: t.Any) -> dict:
    return example_config("openmeter", sandbox, **overrides)


def stripe_config(sandbox: Sandbox, **overrides: t.Any) -> dict:
    return example_config("stripe", sandbox, **overrides)


def run_target(
    tmp_path: Path,
    config: dict,
    lines: t.Iterable[str] | str | Path,
    *,
    args: t.Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> Result:
    """Run the real CLI with ``config``; input from a file, a string or lines."""
    config_path = tmp_path / f"config-{time.monotonic_ns()}.json"
    config_path.write_text(json.dumps(config))
    if isinstance(lines, Path):
        input_path = lines
    else:
        input_path = tmp_path / f"input-{time.monotonic_ns()}.jsonl"
        text = lines if isinstance(lines, str) else "\n".join(lines) + "\n"
        input_path.write_text(text)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_USAGE_BILLING_")}
    full_env.update(env or {})
    with open(input_path, "rb") as stdin:
        done = subprocess.run(
            [TARGET, "--config", str(config_path), *args],
            stdin=stdin,
            capture_output=True,
            timeout=timeout,
            env=full_env,
            cwd=tmp_path,
        )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def stamp(seconds_ago: float) -> str:
    """Canonical UTC text for the time ``seconds_ago`` seconds before now."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


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
    stored = {item[ID_FIELD[destination]]: item for item in sandbox.items(destination)}
    assert set(stored) == set(tracks)
    return result, [(tracks[key], item) for key, item in stored.items()]


def singer(
    stream: str,
    records: t.Iterable[dict],
    *,
    schema: dict | None = None,
    key_properties: t.Sequence[str] = (),
    state: dict | None = None,
) -> list[str]:
    """Singer lines for one stream (SCHEMA, RECORDs, optional final STATE)."""
    lines = [
        json.dumps(
            {
                "type": "SCHEMA",
                "stream": stream,
                "schema": schema or {"type": "object", "properties": {}, "additionalProperties": True},
                "key_properties": list(key_properties),
            }
        )
    ]
    lines += [json.dumps({"type": "RECORD", "stream": stream, "record": r}) for r in records]
    if state is not None:
        lines.append(json.dumps({"type": "STATE", "value": state}))
    return lines


FAKE_TAP = str(Path(__file__).with_name("fake_tap.py"))
USAGE_RULE_ORB_AT = {
    "stream": "usage",
    "fields": {
        "external_customer_id": "account",
        "event_name": "'tokens'",
        "timestamp": "at",
        "properties": {"tokens": "tokens", "note": "note"},
    },
}
USAGE_RULE_LAGO_AT = {
    "stream": "usage",
    "fields": {
        "external_subscription_id": "account",
        "code": "'tokens'",
        "timestamp": "at",
        "properties": {"tokens": "tokens", "note": "note"},
    },
}
USAGE_RULE_LAGO = {
    "stream": "usage",
    "fields": {**USAGE_RULE_LAGO_AT["fields"], "timestamp": "now_ts"},  # type: ignore[dict-item]
}
USAGE_RULE_OPENMETER_AT = {
    "stream": "usage",
    "fields": {
        "subject": "account",
        "type": "'tokens'",
        "time": "at",
        "data": {"tokens": "tokens", "note": "note"},
    },
}
USAGE_RULE_OPENMETER = {
    "stream": "usage",
    "fields": {**USAGE_RULE_OPENMETER_AT["fields"], "time": "now_ts"},  # type: ignore[dict-item]
}
USAGE_RULE_STRIPE_AT = {
    "stream": "usage",
    "fields": {
        "event_name": "'tokens'",
        "timestamp": "at",
        "payload": {"stripe_customer_id": "account", "value": "tokens", "note": "note"},
    },
}
USAGE_RULE_STRIPE = {
    "stream": "usage",
    "fields": {**USAGE_RULE_STRIPE_AT["fields"], "timestamp": "now_ts"},  # type: ignore[dict-item]
}
USAGE_RULE_ORB = {
    "stream": "usage",
    "fields": {**USAGE_RULE_ORB_AT["fields"], "timestamp": "now_ts"},  # type: ignore[dict-item]
}

USAGE_RULE_METRONOME = {
    "stream": "usage",
    "fields": {
        "customer_id": "account",
        "event_type": "'tokens'",
        "timestamp": "now_ts",
        "properties": {"tokens": "tokens", "note": "note"},
    },
}


class Pipeline:
    """fake_tap | target-usage-billing, with the target's stdout (STATE) in a file."""

    def __init__(
        self,
        tmp: Path,
        config: dict,
        count: int,
        *,
        state: dict | None = None,
        every: int = 100,
        pause: float = 0.0,
        name: str = "run",
        base_epoch: int = 1795184122,
    ):
        self.tmp = tmp
        config_path = tmp / f"{name}-config.json"
        config_path.write_text(json.dumps(config))
        tap_args = [
            sys.executable,
            FAKE_TAP,
            "--count",
            str(count),
            "--every",
            str(every),
            "--pause",
            str(pause),
            "--base-epoch",
            str(base_epoch),
        ]
        if state is not None:
            state_path = tmp / f"{name}-state-in.json"
            state_path.write_text(json.dumps(state))
            tap_args += ["--state", str(state_path)]
        self.stdout_path = tmp / f"{name}-stdout.txt"
        self.stderr_path = tmp / f"{name}-stderr.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_USAGE_BILLING_")}
        self.tap = subprocess.Popen(tap_args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.target = subprocess.Popen(
                [TARGET, "--config", str(config_path)],
                stdin=self.tap.stdout,
                stdout=out,
                stderr=err,
                env=env,
                cwd=tmp,
            )
        self.tap.stdout.close()

    def wait(self, timeout: float = 120) -> int:
        code = self.target.wait(timeout)
        self.tap.wait(timeout)
        return code

    def kill(self) -> None:
        self.target.send_signal(signal.SIGKILL)
        self.wait()

    @property
    def states(self) -> list[dict]:
        # only complete lines: a SIGKILL can cut the last one
        text = self.stdout_path.read_text()
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


def wait_until(predicate, timeout: float = 60, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(step)


def position(state: dict | None) -> int:
    return state["bookmarks"]["usage"]["position"] if state else 0


# --- helpers shared by the delivery, loss and failure tests ------------------------------

RECENT = int(time.time()) - 3600  # inside Metronome's 34-day window, never in the future
DEFAULT_DEAD_LETTERS = "target-usage-billing-dead-letters.jsonl"
# Metronome's rule for the usage rows below (and fake_tap's): event time from "at"
USAGE_RULE_METRONOME_AT = {
    "stream": "usage",
    "fields": {
        "customer_id": "account",
        "event_type": "'tokens'",
        "timestamp": "at",
        "properties": {"tokens": "tokens", "note": "note"},
    },
}


def config_for(destination: str, sandbox: Sandbox, **overrides: t.Any) -> dict:
    """The example config of ``destination`` with the usage-row rule and ``overrides``."""
    return example_config(destination, sandbox, **{"mappings": [USAGE_RULES_AT[destination]], **overrides})


# What the test families need to know of each destination.
DESTINATIONS_UNDER_TEST = ["m3ter", "metronome", "orb", "lago", "openmeter", "stripe"]
ID_FIELD = {
    "m3ter": "uid",
    "metronome": "transaction_id",
    "orb": "idempotency_key",
    "lago": "transaction_id",
    "openmeter": "id",
    "stripe": "identifier",
}
MAX_ITEMS = {"m3ter": 1000, "metronome": 100, "orb": 500, "lago": 100, "openmeter": 500, "stripe": 100}
SECRETS = {
    "m3ter": M3TER_SECRET,
    "metronome": METRONOME_TOKEN,
    "orb": ORB_KEY,
    "lago": LAGO_KEY,
    "openmeter": OPENMETER_TOKEN,
    "stripe": STRIPE_KEY,
}
# where the usage rows' "note" lands in a stored item
NOTE_FIELD = {"m3ter": "metadata", "openmeter": "data", "stripe": "payload"}


def api_url_settings(destination: str, url: str) -> dict:
    """Settings sending every request of ``destination`` to ``url``."""
    return SANDBOX_URLS[destination](url)


# Each destination's rule for the usage rows (event time from "at").
USAGE_RULES_AT = {
    "m3ter": USAGE_RULE_M3TER,
    "metronome": USAGE_RULE_METRONOME_AT,
    "orb": USAGE_RULE_ORB_AT,
    "lago": USAGE_RULE_LAGO_AT,
    "openmeter": USAGE_RULE_OPENMETER_AT,
    "stripe": USAGE_RULE_STRIPE_AT,
}


def usage(count: int, start: int = 0, **extra: t.Any) -> list[dict]:
    """Usage rows id = start .. start+count-1, stamped an hour ago."""
    return [
        {"id": i, "account": f"a{i % 7}", "at": RECENT + i, "tokens": i, "note": f"n{i}", **extra}
        for i in range(start, start + count)
    ]


def dead_letters(directory: Path, name: str = DEFAULT_DEAD_LETTERS) -> list[dict]:
    path = directory / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- shared by several test files ----------------------------------------------------


def usage_records(count: int, **fields) -> list[dict]:
    return [
        {"id": i, "account": f"a{i % 7}", "at": 1795184122 + i, "tokens": i, **fields} for i in range(count)
    ]


def usage_config(sandbox, **overrides):
    return m3ter_config(sandbox, mappings=[USAGE_RULE_M3TER], **overrides)


def crash_config(sandbox, destination: str = "m3ter", **overrides) -> dict:
    settings = {
        "batch_size_rows": 50,
        "max_requests_in_flight": 3,
        "state_checkpoint_seconds": 0.1,
        **overrides,
    }
    return config_for(destination, sandbox, **settings)


@pytest.fixture
def tls_sandbox(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    sandbox = start_sandbox(tmp_path / "sandbox", "--tls-cert", str(cert), "--tls-key", str(key))
    yield sandbox, cert
    stop_sandbox(sandbox)


# --- the vendors' SDK request types as referees -------------------------------------------


def referee_bodies(tmp_path: Path, destination: str, *, seed: int, hours: int) -> list[list[t.Any]]:
    """The request bodies dry runs of ``destination``'s example config write: one list for
    the bundled Segment example, one for 2,000 generated events (the referees judge both)."""
    config = json.loads((EXAMPLES / f"{destination}-segment.config.json").read_text())
    mixed = list(singer_lines(2000, seed=seed, hours=hours, state_every=500))
    found = []
    for name, lines in (("example", EXAMPLES / "segment-events.singer.jsonl"), ("mixed", mixed)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        result = run_target(run_dir, {**config, "dry_run": True}, lines)
        assert result.returncode == 0, result.stderr
        written = (run_dir / "dry-run-requests.jsonl").read_text().splitlines()
        found.append([json.loads(line)["body"] for line in written])
    return found


def problems(value: t.Any, annotation: t.Any, where: str) -> list[str]:
    """Where ``value`` (decoded JSON) does not fit the SDK's type ``annotation``."""
    origin = t.get_origin(annotation)
    if origin in (typing_extensions.Required, typing_extensions.NotRequired, t.Annotated):
        return problems(value, t.get_args(annotation)[0], where)
    if origin is t.Union or isinstance(annotation, types.UnionType):
        options = []
        for option in t.get_args(annotation):
            try:
                found = problems(value, option, where)
            except AssertionError:  # a type no JSON value is (e.g. Stripe's UntypedStripeObject)
                continue
            if not found:
                return []
            options.append(found)
        return min(options, key=len) if options else [f"{where}: fits none of {annotation!r}"]
    if annotation is t.Any:
        return []
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a whole number, got {value!r}"]
    fields = getattr(annotation, "__fields__", None)
    if (
        isinstance(annotation, type)
        and isinstance(fields, dict)
        and not typing_extensions.is_typeddict(annotation)
    ):
        # a pydantic (v1) model, as Lago's SDK declares its request bodies
        if not isinstance(value, dict):
            return [f"{where}: expected an object"]
        hints = t.get_type_hints(annotation)
        found = [
            f"{where}.{key}: missing (required)"
            for key, f in fields.items()
            if f.required and key not in value
        ]
        found += [f"{where}.{key}: not a field of {annotation.__name__}" for key in value if key not in hints]
        for key, item in value.items():
            if key in hints:
                found += problems(item, hints[key], f"{where}.{key}")
        return found
    if typing_extensions.is_typeddict(annotation):
        if not isinstance(value, dict):
            return [f"{where}: expected an object"]
        hints = typing_extensions.get_type_hints(annotation, include_extras=True)
        # with postponed annotations the class's __required_keys__ can miss Required[...]
        required = set(annotation.__required_keys__) | {
            key for key, hint in hints.items() if t.get_origin(hint) is typing_extensions.Required
        }
        found = [f"{where}.{key}: missing (required)" for key in sorted(required) if key not in value]
        found += [f"{where}.{key}: not a field of {annotation.__name__}" for key in value if key not in hints]
        for key, item in value.items():
            if key in hints:
                found += problems(item, hints[key], f"{where}.{key}")
        return found
    if origin is dict:
        key_type, value_type = t.get_args(annotation)
        if not isinstance(value, dict):
            return [f"{where}: expected an object"]
        found = []
        for key, item in value.items():
            found += problems(key, key_type, f"{where} key")
            found += problems(item, value_type, f"{where}.{key}")
        return found
    if annotation is object:
        return []
    if annotation is type(None):
        return [] if value is None else [f"{where}: expected null, got {value!r}"]
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a number, got {value!r}"]
    if annotation is str:
        return [] if isinstance(value, str) else [f"{where}: expected a string, got {value!r}"]
    if annotation is dt.datetime:
        return [f"{where}: a datetime cannot arrive as JSON"]
    raise AssertionError(f"{where}: no rule for {annotation!r}")
