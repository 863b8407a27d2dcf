"""Ids that do not change when a tap's key properties do (issue 20, item 3).

A derived id is computed from the stream's key properties: a SCHEMA that announces other
key properties would give the same record a new id, and the platform would bill it twice.
"""

from __future__ import annotations

import json

import pytest

from target_usage_billing.idscheme import accepted, key_change_error
from tests.helpers import run_target, singer, usage
from tests.platforms import USAGE_RULE_M3TER, config_for


def schema(keys: list[str]) -> str:
    return json.dumps(
        {
            "type": "SCHEMA",
            "stream": "usage",
            "schema": {"type": "object", "properties": {}},
            "key_properties": keys,
        }
    )


def rekeyed_input() -> list[str]:
    first = singer("usage", usage(5), key_properties=["id"], state={"p": 1})
    second = singer("usage", usage(5), key_properties=["id", "account"], state={"p": 2})
    return [*first, *second]  # the same five records again, announced with other keys


def test_other_key_properties_mid_run_stop_the_run_naming_both_lists(sandbox, tmp_path):
    result = run_target(tmp_path, config_for("m3ter", sandbox), rekeyed_input())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.error_lines
    assert "stream 'usage' changed its key properties from ['id'] to ['id', 'account']" in line
    assert "accept_key_property_changes" in line
    # everything before the SCHEMA was delivered and checkpointed, nothing after it was sent
    assert sandbox.stats("m3ter")["stored"] == 5
    assert result.states == [{"p": 1}]


def test_an_explicit_id_makes_key_property_changes_harmless(sandbox, tmp_path):
    rule = {
        **USAGE_RULE_M3TER,
        "fields": {**USAGE_RULE_M3TER["fields"], "uid": "join('-', ['u', to_string(id)])"},
    }
    result = run_target(tmp_path, config_for("m3ter", sandbox, mappings=[rule]), rekeyed_input())
    assert result.returncode == 0, result.stderr
    stats = sandbox.stats("m3ter")
    assert stats["stored"] == 5  # the same ids the second time: not billed twice
    assert result.states[-1] == {"p": 2}


def test_an_accepted_change_goes_on_with_new_ids(sandbox, tmp_path):
    config = config_for("m3ter", sandbox, accept_key_property_changes=["us*"])
    result = run_target(tmp_path, config, rekeyed_input())
    assert result.returncode == 0, result.stderr
    assert sandbox.stats("m3ter")["stored"] == 10  # what the user accepted: new ids
    assert result.states[-1] == {"p": 2}


def test_the_same_key_properties_again_are_fine(sandbox, tmp_path):
    lines = [*singer("usage", usage(3), key_properties=["id"]), schema(["id"])]
    result = run_target(tmp_path, config_for("m3ter", sandbox), lines)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("previous", "new", "explicit_id", "acknowledged", "fails"),
    [
        (["id"], ["id"], False, False, False),
        (["id"], ["id", "account"], False, False, True),
        ([], ["id"], False, False, True),  # whole-record ids become key ids
        (["id"], [], False, False, True),
        (["id"], ["uuid"], True, False, False),
        (["id"], ["uuid"], False, True, False),
    ],
)
def test_the_check_takes_a_remembered_key_list(previous, new, explicit_id, acknowledged, fails):
    # the run journal (across runs) feeds the same function its remembered key list
    error = key_change_error("s", previous, new, explicit_id=explicit_id, acknowledged=acknowledged)
    assert (error is not None) == fails
    if fails:
        assert error is not None and f"from {previous} to {new}" in error


def test_accepted_streams_are_names_or_globs():
    assert accepted("usage", ["usage"]) and accepted("api_usage", ["api_*"])
    assert not accepted("usage", None) and not accepted("usage", ["other"])


# --- across runs: the run journal remembers each stream's key properties ---------------


def test_other_key_properties_in_a_later_run_stop_it_naming_both_lists(sandbox, tmp_path):
    config = config_for("m3ter", sandbox)
    first = run_target(tmp_path, config, singer("usage", usage(5), key_properties=["id"], state={"p": 1}))
    assert first.returncode == 0, first.stderr
    # the tap was upgraded: the same records, other key properties
    rekeyed = singer("usage", usage(5), key_properties=["id", "account"], state={"p": 2})

    second = run_target(tmp_path, config, rekeyed)

    assert second.returncode == 2, second.stderr
    (line,) = second.error_lines
    assert "changed its key properties from ['id'] to ['id', 'account']" in line
    assert "previous run" in line
    assert sandbox.stats("m3ter")["stored"] == 5  # nothing billed twice
    assert second.states == []

    # accepted once: the new keys are remembered and later runs go on with them
    accepting = {**config, "accept_key_property_changes": ["usage"]}
    third = run_target(tmp_path, accepting, rekeyed)
    assert third.returncode == 0, third.stderr
    fourth = run_target(tmp_path, config, rekeyed)
    assert fourth.returncode == 0, fourth.stderr
    assert sandbox.stats("m3ter")["stored"] == 10  # the accepted change's new ids, once


def test_a_later_run_with_an_explicit_id_is_not_stopped(sandbox, tmp_path):
    rule = {
        **USAGE_RULE_M3TER,
        "fields": {**USAGE_RULE_M3TER["fields"], "uid": "join('-', ['u', to_string(id)])"},
    }
    config = config_for("m3ter", sandbox, mappings=[rule])
    first = run_target(tmp_path, config, singer("usage", usage(5), key_properties=["id"]))
    second = run_target(tmp_path, config, singer("usage", usage(5), key_properties=["account"]))
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert sandbox.stats("m3ter")["stored"] == 5


def test_a_run_that_failed_before_its_first_state_still_remembers_the_keys_it_billed(sandbox, tmp_path):
    # a backfill whose tap writes STATE only at the end: the first batch is billed, then the run fails
    sandbox.faults({"kind": "503", "every": 2, "headers": {"x-should-retry": "false"}})
    config = config_for("m3ter", sandbox, batch_size_rows=2, max_requests_in_flight=1)
    first = run_target(tmp_path, config, singer("usage", usage(6), key_properties=["id"], state={"p": 1}))
    assert first.returncode == 4, first.stderr
    assert first.states == [] and sandbox.stats("m3ter")["stored"] == 2
    sandbox.faults()

    rekeyed = run_target(tmp_path, config, singer("usage", usage(6), key_properties=["id", "account"]))

    assert rekeyed.returncode == 2, rekeyed.stderr
    assert "changed its key properties from ['id'] to ['id', 'account']" in rekeyed.error_lines[0]
    assert sandbox.stats("m3ter")["stored"] == 2  # the billed rows are not billed again under new ids
