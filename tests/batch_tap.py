"""A real singer-sdk tap whose records travel as BATCH files: `batch_tap.py --config FILE`.

Settings: ``count`` records of stream ``usage`` (id, account, at, tokens, note; each
record's content depends only on its id) and the SDK's own ``batch_config``.
"""

from __future__ import annotations

import typing as t

from singer_sdk import Stream, Tap
from singer_sdk import typing as th


class UsageStream(Stream):
    name = "usage"
    primary_keys: t.ClassVar[list[str]] = ["id"]
    schema = th.PropertiesList(
        th.Property("id", th.IntegerType),
        th.Property("account", th.StringType),
        th.Property("at", th.IntegerType),
        th.Property("tokens", th.NumberType),
        th.Property("note", th.StringType),
    ).to_dict()

    def get_records(self, context: dict | None) -> t.Iterable[dict]:
        base = self.config.get("base_epoch", 1795184122)
        for i in range(self.config["count"]):
            yield {"id": i, "account": f"a{i % 13}", "at": base + i, "tokens": i, "note": f"n{i}"}


class BatchTap(Tap):
    name = "tap-batch-usage"
    config_jsonschema = th.PropertiesList(
        th.Property("count", th.IntegerType, required=True),
        th.Property("base_epoch", th.IntegerType),
    ).to_dict()

    def discover_streams(self) -> list[Stream]:
        return [UsageStream(self)]


if __name__ == "__main__":
    BatchTap.cli()
