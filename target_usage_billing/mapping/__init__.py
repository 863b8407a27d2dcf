"""Pure mapping: per-stream rules that turn a Singer record into billing payloads.

A rule is ``{"name": NAME?, "stream": GLOB, "preset": NAME?, "filter": EXPR?, "fields":
{...}}``; every rule whose pattern and filter match a record bills it (``fanout``). Every
field value is a JMESPath expression compiled once at start-up. The destination says
which fields exist and what kind each is (``FieldSpec``); this package knows nothing of
HTTP or of any particular billing platform.

- ``spec``: what a destination declares (FieldKind, FieldSpec, Preset) and MappingRejection
- ``expressions``: JMESPath compiled, the common subset as Python closures
- ``coerce``: values made into text, exact numbers, UTC timestamps, JSON
- ``ids``: derived idempotency keys
- ``fields``: one payload field compiled
- ``rules``: the ``mappings`` setting compiled, matched to streams
- ``codegen``: each rule as one generated Python function (the hot path)
- ``fanout``: the rules that fire on one stream, as one function; id collision checks
"""

from target_usage_billing.mapping.coerce import (
    encode_payload,
    payload_encoder,
    to_number,
    to_string,
    to_utc_timestamp,
)
from target_usage_billing.mapping.expressions import (
    compile_expression,
    is_truthy,
    jmespath_not,
    jmespath_order,
)
from target_usage_billing.mapping.fanout import StreamPlan, check_id_collisions, patterns_overlap
from target_usage_billing.mapping.ids import derive_id
from target_usage_billing.mapping.rules import (
    CompiledRule,
    FieldRead,
    compile_rules,
    find_rule,
    find_rules,
)
from target_usage_billing.mapping.spec import FieldKind, FieldSpec, MappingRejection, Preset

__all__ = [
    "CompiledRule",
    "FieldKind",
    "FieldRead",
    "FieldSpec",
    "MappingRejection",
    "Preset",
    "StreamPlan",
    "check_id_collisions",
    "compile_expression",
    "compile_rules",
    "derive_id",
    "encode_payload",
    "find_rule",
    "find_rules",
    "is_truthy",
    "jmespath_not",
    "jmespath_order",
    "patterns_overlap",
    "payload_encoder",
    "to_number",
    "to_string",
    "to_utc_timestamp",
]
