"""Meltano setting definitions derived from `target-usage-billing --about --format=json`.

`python scripts/meltano_settings.py` prints the YAML list for meltano.yml's loader
`settings:`; tests compare meltano.yml with `expected_settings()`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

KINDS = {
    "string": "string",
    "integer": "integer",
    "number": "decimal",
    "boolean": "boolean",
    "object": "object",
    "array": "array",
}


def about() -> dict:
    exe = Path(sys.executable).parent / "target-usage-billing"
    done = subprocess.run([str(exe), "--about", "--format=json"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _kind(schema: dict) -> str:
    types = schema.get("type", "string")
    types = [types] if isinstance(types, str) else [t for t in types if t != "null"]
    return KINDS.get(types[0], "string") if types else "string"


def expected_settings(info: dict | None = None) -> list[dict]:
    info = info or about()
    settings = []
    for name, schema in info["settings"]["properties"].items():
        entry = {
            "name": name,
            "kind": _kind(schema),
            "label": name.replace("_", " ").capitalize(),
            "description": schema.get("description", ""),
        }
        if schema.get("secret"):
            entry["sensitive"] = True
        if "enum" in schema:
            entry["kind"] = "options"
            entry["options"] = [{"label": value, "value": value} for value in schema["enum"]]
        settings.append(entry)
    return settings


if __name__ == "__main__":
    print(yaml.safe_dump(expected_settings(), sort_keys=False, width=100))
