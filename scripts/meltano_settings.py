"""Meltano plugin definition derived from `target-usage-billing --about --format=json`.

    python scripts/meltano_settings.py                 # the settings: list for meltano.yml
    python scripts/meltano_settings.py --definition    # meltano/target-usage-billing.yml
    python scripts/meltano_settings.py --definition --pip-url "$PWD"   # installs this checkout

The definition (Meltano Hub format) is what `meltano add --plugin-type loader
target-usage-billing --from-ref FILE` reads; tests keep the shipped file and meltano.yml
equal to what this script generates.
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


PIP_URL = "target-usage-billing"
# `meltano invoke target-usage-billing:reconcile`: Meltano hands the plugin its settings as
# TARGET_USAGE_BILLING_* variables, which --config ENV reads.
COMMANDS = {
    "reconcile": {
        "args": "--config ENV --reconcile",
        "description": "Read back from the platform what the run journal says it acknowledged; "
        "exit 8 when anything is missing or invalid (add --since/--until for other days).",
    },
    # `meltano invoke target-usage-billing:replay DEAD_LETTERS.jsonl [--stage api]`
    "replay": {
        "args": "--config ENV --replay",
        "description": "Send the records of a dead-letter file (the argument) again through the "
        "current mapping, ids unchanged; records rejected again go to a new dead-letter file "
        "beside it (add --stage mapping,validation,api to choose stages).",
    },
}
DEFINITION_PATH = Path(__file__).resolve().parent.parent / "meltano" / "target-usage-billing.yml"


def plugin_definition(info: dict | None = None, pip_url: str = PIP_URL) -> dict:
    """The loader as Meltano Hub describes plugins, with one settings group per destination."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from target_usage_billing.destinations import DESTINATIONS

    info = info or about()
    required = info["settings"].get("required", [])
    return {
        "name": info["name"],
        "namespace": "target_usage_billing",
        "variant": "usage-billing",
        "label": "Usage billing (m3ter, Metronome, Orb, Lago, OpenMeter, Stripe)",
        "description": info.get("description") or "",
        "pip_url": pip_url,
        "executable": info["name"],
        "capabilities": info["capabilities"],
        "settings_group_validation": [
            [*required, *destination.required_settings] for destination in DESTINATIONS.values()
        ],
        "settings": expected_settings(info),
        "commands": COMMANDS,
    }


def main() -> None:
    args = sys.argv[1:]
    if "--definition" in args:
        pip_url = args[args.index("--pip-url") + 1] if "--pip-url" in args else PIP_URL
        print(yaml.safe_dump(plugin_definition(pip_url=pip_url), sort_keys=False, width=100), end="")
    else:
        print(yaml.safe_dump(expected_settings(), sort_keys=False, width=100))


if __name__ == "__main__":
    main()
