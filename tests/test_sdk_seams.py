"""Guards on the singer-sdk seams this target relies on: an SDK upgrade that moves one
of them fails here, by name, instead of changing the target's behaviour in silence.

The two private overrides live in ``target_usage_billing/sdk_overrides.py`` (with the
upstream issue each waits for); everything else the target uses is public API, checked
here too (names and signatures). The guards check behaviour, not the SDK's source text:
each drives the SDK for real and watches the override, or the reader, being called.
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
from target_usage_billing.errors import ConfigError
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


def test_the_sdk_still_calls_validate_config_from_init_with_raise_errors(config, monkeypatch):
    parameters = inspect.signature(PluginBase._validate_config).parameters
    assert list(parameters) == ["self", "raise_errors"]
    assert parameters["raise_errors"].kind is inspect.Parameter.KEYWORD_ONLY
    calls: list[bool] = []
    override = sdk_overrides.SettingsCheck._validate_config

    def watched(self, *, raise_errors: bool = True) -> list[str]:
        calls.append(raise_errors)
        return override(self, raise_errors=raise_errors)

    monkeypatch.setattr(sdk_overrides.SettingsCheck, "_validate_config", watched)
    target = TargetUsageBilling(config=config, validate_config=True)
    target.billing_run.close()
    assert calls == [True], "PluginBase.__init__ no longer calls _validate_config(raise_errors=True)"


def test_an_invalid_secret_is_refused_by_the_override_without_showing_it(config):
    # the SDK's own check would quote the value in its ConfigValidationError
    with pytest.raises(ConfigError) as raised:
        TargetUsageBilling(config={**config, "metronome_api_token": 987654321123}, validate_config=True)
    assert str(raised.value).startswith("invalid settings: ")
    assert "(secret value not shown)" in str(raised.value)
    assert "987654321123" not in str(raised.value)


def test_the_override_of_validate_config_is_the_one_that_runs(config):
    # Environment numbers arrive as text: only the override turns "60" into 60.0.
    target = TargetUsageBilling(config={**config, "max_retry_seconds": "60"}, validate_config=True)
    assert target.config["max_retry_seconds"] == 60.0
    target.billing_run.close()


def _listen(target: TargetUsageBilling, lines: list[dict]) -> None:
    target.listen(io.StringIO("".join(json.dumps(line) + "\n" for line in lines)))


SCHEMA = {
    "type": "SCHEMA",
    "stream": "usage",
    "schema": {"type": "object", "properties": {"c": {"type": "string"}, "t": {"type": "string"}}},
    "key_properties": [],
}


def test_the_sdk_still_calls_validate_and_parse_on_every_record_of_its_own_path(config, monkeypatch):
    parameters = inspect.signature(Sink._validate_and_parse).parameters
    assert list(parameters) == ["self", "record"]
    seen: list[dict] = []
    override = sdk_overrides.RecordCheck._validate_and_parse

    def watched(self, record: dict) -> dict:
        seen.append(dict(record))
        return override(self, record)

    monkeypatch.setattr(sdk_overrides.RecordCheck, "_validate_and_parse", watched)
    # record metadata (_sdc_* properties) sends every record down the SDK's own path
    target = TargetUsageBilling(config={**config, "add_record_metadata": True}, validate_config=True)
    records = [{"c": f"acct{n}", "t": "2026-11-20T00:00:00Z"} for n in range(3)]
    _listen(target, [SCHEMA, *({"type": "RECORD", "stream": "usage", "record": r} for r in records)])
    assert [record["c"] for record in seen] == ["acct0", "acct1", "acct2"], (
        "Target._process_record_message no longer calls Sink._validate_and_parse once per record"
    )


def test_a_record_breaking_its_schema_on_the_sdks_path_is_dead_lettered_by_the_override(config, tmp_path):
    settings = {"add_record_metadata": True, "validate_records": True, "max_rejected_ratio": 1}
    target = TargetUsageBilling(config={**config, **settings}, validate_config=True)
    good = {"c": "acct", "t": "2026-11-20T00:00:00Z"}
    bad = {"c": 12, "t": "2026-11-20T00:00:00Z"}  # c must be a string
    _listen(
        target,
        [
            SCHEMA,
            {"type": "RECORD", "stream": "usage", "record": bad},
            {"type": "RECORD", "stream": "usage", "record": good},
        ],
    )
    (dead,) = [json.loads(line) for line in (tmp_path / "dead-letters.jsonl").read_text().splitlines()]
    assert "12 is not of type 'string'" in json.dumps(dead)
    (request,) = [json.loads(line) for line in (tmp_path / "dry-run.jsonl").read_text().splitlines()]
    assert [item["customer_id"] for item in request["body"]] == ["acct"]  # the good one went on


def test_the_public_seams_the_target_uses_are_still_there():
    # the reader: the SDK hands its handlers to process_lines (watched in use below)
    assert list(inspect.signature(GenericSingerReader.process_lines).parameters) == [
        "self",
        "file_input",
        "callbacks",
    ]
    assert callable(BaseSingerReader.process_lines)
    assert callable(GenericSingerReader.assert_line_requires)
    # sinks: looked up, tallied, validated, counted through public names
    for name in ("get_sink", "sink_exists", "drain_all", "print_about", "print_version"):
        assert callable(getattr(Target, name)), name
    assert list(inspect.signature(Sink.tally_record_read).parameters) == ["self", "count"]
    assert callable(Sink.get_validator)
    assert isinstance(inspect.getattr_static(Sink, "record_counter_metric"), property)


def test_the_sdk_hands_the_reader_a_handler_for_every_message_type(config, monkeypatch):
    handed: list[set] = []
    process_lines = LineReader.process_lines

    def watched(self, file_input, callbacks):
        handed.append(set(callbacks))
        return process_lines(self, file_input, callbacks)

    monkeypatch.setattr(LineReader, "process_lines", watched)
    target = TargetUsageBilling(config=config, validate_config=True)
    _listen(target, [SCHEMA])
    kinds = {"SCHEMA", "RECORD", "STATE", "ACTIVATE_VERSION", "BATCH"}
    assert handed == [{SingerMessageType[kind] for kind in kinds}], (
        "Target.listen no longer hands message_reader.process_lines one callback per message type"
    )


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


def test_a_validation_error_that_counts_first_keeps_its_violations_on_one_line():
    # singer-sdk 0.55's shape: the count first, each violation on a line (or a note) after
    from singer_sdk.exceptions import InvalidRecord

    from target_usage_billing.sdk_overrides import _validation_error

    lines = InvalidRecord("2 schema validation error(s)\n$.a: 1 is not of type 'string'\n$.b: x", {})
    assert _validation_error(lines) == (
        "Record Message Validation Error: 2 schema validation error(s): "
        "$.a: 1 is not of type 'string'; $.b: x"
    )
    single = InvalidRecord("12 is not of type 'string'", {})  # 0.54's shape: the violation itself
    assert _validation_error(single) == "Record Message Validation Error: 12 is not of type 'string'"
    if hasattr(single, "add_note"):  # Python 3.11+
        noted = InvalidRecord("1 schema validation error(s)", {})
        noted.add_note("$.c: 12 is not of type 'string'")
        assert _validation_error(noted).endswith("error(s): $.c: 12 is not of type 'string'")


@pytest.mark.parametrize("sdk_path", [False, True])
def test_the_direct_path_checks_key_properties_as_the_sdks_path_does(config, sdk_path):
    from singer_sdk.exceptions import MissingKeyPropertiesError

    settings = {"add_record_metadata": True} if sdk_path else {}
    target = TargetUsageBilling(config={**config, **settings}, validate_config=True)
    keyed = {**SCHEMA, "key_properties": ["id"]}
    record = {"type": "RECORD", "stream": "usage", "record": {"c": "acct", "t": "2026-11-20T00:00:00Z"}}
    with pytest.raises(MissingKeyPropertiesError, match=r"Record is missing one or more key_properties"):
        _listen(target, [keyed, record])
    assert bool(target._direct_sinks) is not sdk_path  # the path the record took
    target.billing_run.close()
