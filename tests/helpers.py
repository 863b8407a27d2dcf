"""Platform-neutral test helpers: the real sandbox and the real CLI, as subprocesses on
loopback, and the Singer lines and usage rows the tests feed them. What differs by
platform is in ``tests/platforms.py``; the fixtures are in ``tests/conftest.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

import requests

from target_usage_billing.sandbox.launch import launch

BIN = Path(sys.executable).parent
TARGET = str(BIN / "target-usage-billing")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
FAKE_TAP = str(Path(__file__).with_name("fake_tap.py"))


RECENT = int(time.time()) - 3600  # inside Metronome's 34-day window, never in the future


DEFAULT_DEAD_LETTERS = "target-usage-billing-dead-letters.jsonl"


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


def self_signed_cert(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by openssl in ``tmp``."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
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
    return cert, key


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


def usage(count: int, start: int = 0, **extra: t.Any) -> list[dict]:
    """Usage rows id = start .. start+count-1, stamped an hour ago."""
    return [
        {"id": i, "account": f"a{i % 7}", "at": RECENT + i, "tokens": i, "note": f"n{i}", **extra}
        for i in range(start, start + count)
    ]


def dead_letters(directory: Path, name: str = DEFAULT_DEAD_LETTERS) -> list[dict]:
    path = directory / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def usage_records(count: int, **fields) -> list[dict]:
    return [
        {"id": i, "account": f"a{i % 7}", "at": 1795184122 + i, "tokens": i, **fields} for i in range(count)
    ]
