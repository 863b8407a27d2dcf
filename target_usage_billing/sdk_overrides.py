"""The two singer-sdk internals this target overrides, because no public hook does the job.

Everything else goes through the SDK's public API: the message reader (``message_reader_class``
and the callbacks it is handed), ``get_sink``/``sink_exists``, ``tally_record_read``,
``get_validator``, ``print_about``. ``tests/test_sdk_seams.py`` fails if a later SDK
renames either method below, changes its signature or stops calling it where this
module expects (it drives the SDK and watches each override being called), so an SDK
upgrade that breaks them is a red test, not a silent change.

What each override waits for upstream (meltano/sdk), to be dropped when it lands:

- ``_validate_config``: meltano/sdk#1310, "--config ENV does not work for non-string
  config properties" (closed as stale, not fixed): environment values are validated as
  the strings they arrive as. No SDK issue found for keeping a mistyped secret out of
  the ConfigValidationError message, the override's other half.
- ``_validate_and_parse``: meltano/sdk#133, "Error Handling and dead letter queues for
  targets" (open): no public hook takes a record that fails validation, or a date-time
  the SDK cannot parse (as in meltano/sdk#2711), without stopping the run or logging a
  traceback.
"""

from __future__ import annotations

import json
import typing as t

from singer_sdk.exceptions import ConfigValidationError, InvalidRecord

from target_usage_billing.errors import ConfigError

# The SDK's name for each override, for the guard tests.
TARGET_CONFIG_CHECK = "_validate_config"  # PluginBase.__init__ calls it with raise_errors
SINK_RECORD_CHECK = "_validate_and_parse"  # Target._process_record_message calls it per record


class SettingsCheck:
    """Mixin for the Target: settings are normalised before the SDK validates them, and
    a validation error never shows a secret.

    Replaces ``PluginBase._validate_config``, which raises ConfigValidationError quoting
    the offending values (a mistyped secret included) and validates environment
    variables as the strings they arrive as (``TARGET_USAGE_BILLING_MAX_RETRY_SECONDS=60``
    would be refused as "not a number"). The SDK calls it from ``__init__``, after the
    config files and the environment are merged: the only point where both are known.
    """

    config_jsonschema: t.ClassVar[dict]
    destination_settings: t.ClassVar[frozenset[str]]
    _config: dict

    def _validate_config(self, *, raise_errors: bool = True) -> list[str]:
        properties = self.config_jsonschema["properties"]
        for name, prop in properties.items():
            value = self._config.get(name)
            if not isinstance(value, str):
                continue
            if "number" in str(prop.get("type")):
                # Environment variables arrive as strings: read numbers as numbers.
                try:
                    self._config[name] = float(value)
                except ValueError:
                    pass  # left for the schema check to report
            elif value != value.strip() and (prop.get("secret") or name in self.destination_settings):
                # A token pasted with its newline would break the request header.
                self._config[name] = value.strip()
        try:
            return super()._validate_config(raise_errors=raise_errors)  # type: ignore[misc]
        except ConfigValidationError as exc:
            errors = "; ".join(exc.errors)
            for name, prop in properties.items():  # never echo a secret, even a mistyped one
                value = self._config.get(name)
                if prop.get("secret") and value not in (None, ""):
                    for shown in {str(value), repr(value), json.dumps(value, default=str)}:
                        errors = errors.replace(shown, "(secret value not shown)")
            raise ConfigError("invalid settings: " + errors) from None


class RecordCheck:
    """Mixin for the sink: a record that breaks its stream's schema is dead-lettered, and
    date-time strings stay as the tap wrote them.

    Replaces ``Sink._validate_and_parse``, which stops the whole run on one invalid
    record (or logs a traceback and goes on) and turns every date-time string of the
    schema into a datetime, refusing the run on one it cannot parse; here the mapping
    parses the fields it uses and rejects a bad one by name. Only records that take the
    SDK's own path (stream maps, flattening) reach it; the direct path calls it too when
    ``validate_records`` is on.
    """

    record_validator: t.Any  # from get_validator(); None unless validate_records is on
    schema_error: str | None

    def _validate_and_parse(self, record: dict) -> dict:
        if self.record_validator is not None:
            self.schema_error = None
            try:
                self.record_validator.validate(record)
            except InvalidRecord as exc:
                self.schema_error = _validation_error(exc)
        return record


def _validation_error(exc: InvalidRecord) -> str:
    """The record's schema violation on one line.

    singer-sdk 0.54 says the (first) violation itself; 0.55 says how many on the first
    line and each violation in a note (Python 3.11+) or a line of its own (3.10): the
    first three are kept after the count.
    """
    first, *rest = str(exc).splitlines() or [""]
    if not first.endswith("schema validation error(s)"):
        return first
    details = [*getattr(exc, "__notes__", ()), *rest][:3]
    return ": ".join([first, "; ".join(details)])[:1000] if details else first
