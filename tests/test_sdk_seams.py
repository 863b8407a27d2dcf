"""Guards on the singer-sdk seams this target relies on: an SDK upgrade that moves one
of them fails here, by name, instead of changing the target's behaviour in silence.

The two private overrides live in ``target_usage_billing/sdk_overrides.py``; everything
else the target uses is public API, checked here too (names and signatures), and by
behaviour in the other test files.
"""

from __future__ import annotations

import inspect
import io
import json
import signal

import pytest
from singer_sdk import Sink, Target
from singer_sdk.plugin_base import BaseSingerReader, PluginBase
from singer_sdk.singerlib import SingerMessageType
from singer_sdk.singerlib.encoding.base import GenericSingerReader

from target_usage_billing import sdk_overrides
from target_usage_billing.reader import LineReader
from target_usage_billing.sinks import UsageSink
from target_usage_billing.target import TargetUsageBilling


@pytest.fixture
def config(tmp_path) -> dict:
    """A dry run writing its files under tmp_path."""
    return {
        "destination": "metronome",
        "dry_run": True,
        "dry_run_path": str(tmp_path / "dry-run.jsonl"),
        "dead_letter_path": str(tmp_path / "dead-letters.jsonl"),
        "mappings": [
            {"stream": "usage", "fields": {"customer_id": "c", "event_type": "'e'", "timestamp": "t"}}
        ],
        "progress_interval_seconds": 0,
    }


def private_overrides(cls: type, sdk_base: type) -> set[str]:
    """Private SDK methods that ``cls`` (or a mixin of it) defines again."""
    sdk = {
        name
        for klass in sdk_base.__mro__
        if klass.__module__.startswith("singer_sdk")
        for name, value in vars(klass).items()
        if name.startswith("_") and not name.startswith("__") and callable(value)
    }
    ours = {
        name
        for klass in cls.__mro__
        if klass.__module__.startswith("target_usage_billing")
        for name in vars(klass)
    }
    return sdk & ours


def test_exactly_two_private_sdk_methods_are_overridden_both_in_one_module():
    target = private_overrides(TargetUsageBilling, Target)
    sink = private_overrides(UsageSink, Sink)
    assert target == {sdk_overrides.TARGET_CONFIG_CHECK}
    assert sink == {sdk_overrides.SINK_RECORD_CHECK}
    for cls, name in ((TargetUsageBilling, target.pop()), (UsageSink, sink.pop())):
        owner = next(klass for klass in cls.__mro__ if name in vars(klass))
        assert owner.__module__ == "target_usage_billing.sdk_overrides", (name, owner)


def test_the_sdk_still_calls_validate_config_from_init_with_raise_errors():
    parameters = inspect.signature(PluginBase._validate_config).parameters
    assert list(parameters) == ["self", "raise_errors"]
    assert parameters["raise_errors"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "self._validate_config(raise_errors=" in inspect.getsource(PluginBase.__init__)


def test_the_override_of_validate_config_is_the_one_that_runs(config):
    # Environment numbers arrive as text: only the override turns "60" into 60.0.
    target = TargetUsageBilling(config={**config, "max_retry_seconds": "60"}, validate_config=True)
    assert target.config["max_retry_seconds"] == 60.0
    target.billing_run.close()


def test_the_sdk_still_calls_validate_and_parse_on_every_record_of_its_own_path():
    parameters = inspect.signature(Sink._validate_and_parse).parameters
    assert list(parameters) == ["self", "record"]
    assert "._validate_and_parse(" in inspect.getsource(Target._process_record_message)


def test_the_public_seams_the_target_uses_are_still_there():
    # the reader: the SDK hands its handlers to process_lines, keyed by message type
    assert list(inspect.signature(GenericSingerReader.process_lines).parameters) == [
        "self",
        "file_input",
        "callbacks",
    ]
    source = inspect.getsource(BaseSingerReader.process_lines)
    assert "self.message_reader.process_lines(" in source
    for kind in ("SCHEMA", "RECORD", "STATE", "ACTIVATE_VERSION", "BATCH"):
        assert f"SingerMessageType.{kind}:" in source
    assert callable(GenericSingerReader.assert_line_requires)
    # sinks: looked up, tallied, validated, counted through public names
    for name in ("get_sink", "sink_exists", "drain_all", "print_about", "print_version"):
        assert callable(getattr(Target, name)), name
    assert list(inspect.signature(Sink.tally_record_read).parameters) == ["self", "count"]
    assert callable(Sink.get_validator)
    assert isinstance(inspect.getattr_static(Sink, "record_counter_metric"), property)


def test_the_readers_routes_receive_every_message_type(config, tmp_path):
    target = TargetUsageBilling(config=config, validate_config=True)
    seen: list[str] = []
    reader = target.message_reader
    assert isinstance(reader, LineReader)
    routes = dict(reader.routes)
    reader.routes = {
        kind: (lambda message, kind=kind, route=route: (seen.append(kind), route(message)))
        for kind, route in routes.items()
    }
    lines = [
        {
            "type": "SCHEMA",
            "stream": "usage",
            "schema": {"type": "object", "properties": {}},
            "key_properties": [],
        },
        {"type": "RECORD", "stream": "usage", "record": {"c": "acct", "t": "2026-11-20T00:00:00Z"}},
        {"type": "STATE", "value": {"done": 1}},
        {"type": "ACTIVATE_VERSION", "stream": "usage", "version": 1},
    ]
    stdin = io.StringIO("".join(json.dumps(line) + "\n" for line in lines))
    target.listen(stdin)
    assert seen == ["SCHEMA", "RECORD", "STATE", "ACTIVATE_VERSION"]
    assert set(reader.sdk_handlers) >= {SingerMessageType.SCHEMA, SingerMessageType.RECORD}
    # the record went the whole way: mapped and written as the dry run's request body
    (request,) = [json.loads(line) for line in (tmp_path / "dry-run.jsonl").read_text().splitlines()]
    assert request["body"][0]["customer_id"] == "acct"


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_the_targets_stop_handler_replaces_the_sdks(number, config):
    previous = signal.getsignal(number)
    try:
        target = TargetUsageBilling(config=config, validate_config=True)
        handler = signal.getsignal(number)
        assert getattr(handler, "__func__", None) is TargetUsageBilling._on_stop_signal
        assert handler.__self__ is target  # type: ignore[union-attr]
        target.billing_run.close()
    finally:
        signal.signal(number, previous)
