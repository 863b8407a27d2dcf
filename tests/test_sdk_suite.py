"""singer-sdk's standard target tests (the SDK's own .singer files), in dry-run mode.

Dry run writes the exact request bodies instead of sending them, so the suite needs no
sandbox; one catch-all rule maps every test stream (ids derived from the records).
"""

from __future__ import annotations

import tempfile

from singer_sdk.testing import get_target_test_class

from target_usage_billing.target import TargetUsageBilling

DRY_RUN_DIR = tempfile.mkdtemp(prefix="usage-billing-sdk-suite-")

SDK_SUITE_CONFIG = {
    "destination": "m3ter",
    "dry_run": True,
    "dry_run_path": f"{DRY_RUN_DIR}/requests.jsonl",
    "dead_letter_path": f"{DRY_RUN_DIR}/dead-letters.jsonl",
    "max_rejected_ratio": 1,
    "progress_interval_seconds": 0,
    "mappings": [
        {
            "stream": "*",
            "fields": {"meter": "'sdk_suite'", "account": "'sdk-suite'", "ts": "'2026-01-01T00:00:00Z'"},
        }
    ],
}

TestTargetUsageBilling = get_target_test_class(TargetUsageBilling, config=SDK_SUITE_CONFIG)
