"""The README's settings table matches what the target reports with --about."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_settings_table_is_in_sync_with_about():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_table.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_meltano_yml_loader_matches_about():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from meltano_settings import about, expected_settings
    finally:
        sys.path.pop(0)
    import yaml

    project = yaml.safe_load((ROOT / "meltano.yml").read_text())
    (loader,) = [p for p in project["plugins"]["loaders"] if p["name"] == "target-usage-billing"]
    info = about()
    assert loader["settings"] == expected_settings(info)
    assert sorted(loader["capabilities"]) == sorted(info["capabilities"])
    secrets = {s["name"] for s in loader["settings"] if s.get("sensitive")}
    assert secrets == {
        "m3ter_api_secret",
        "metronome_api_token",
        "orb_api_key",
        "lago_api_key",
        "openmeter_api_token",
        "stripe_api_key",
        "journal_url",  # may hold the database password
    }


def test_shipped_meltano_plugin_definition_matches_about():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from meltano_settings import DEFINITION_PATH, plugin_definition
    finally:
        sys.path.pop(0)
    import yaml

    shipped = yaml.safe_load(DEFINITION_PATH.read_text())
    assert shipped == plugin_definition(), (
        "run: python scripts/meltano_settings.py --definition > meltano/target-usage-billing.yml"
    )
    groups = shipped["settings_group_validation"]
    assert ["destination", "mappings", "metronome_api_token"] in groups
    assert ["destination", "mappings", "orb_api_key"] in groups
    assert ["destination", "mappings", "lago_api_key"] in groups
    assert ["destination", "mappings", "stripe_api_key"] in groups
    assert {s["name"] for s in shipped["settings"] if s.get("sensitive")} == {
        "m3ter_api_secret",
        "metronome_api_token",
        "orb_api_key",
        "lago_api_key",
        "openmeter_api_token",
        "stripe_api_key",
        "journal_url",
    }


def test_the_meltano_plugin_definition_names_all_six_platforms():
    # what Meltano Hub and `meltano add` show: the generator and the shipped file both
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from meltano_settings import DEFINITION_PATH, plugin_definition
    finally:
        sys.path.pop(0)
    import yaml

    platforms = ["m3ter", "Metronome", "Orb", "Lago", "OpenMeter", "Stripe"]
    for definition in (plugin_definition(), yaml.safe_load(DEFINITION_PATH.read_text())):
        for field in ("label", "description"):
            missing = [name for name in platforms if name not in definition[field]]
            assert not missing, f"{field} {definition[field]!r} does not name {missing}"
    destination = next(s for s in plugin_definition()["settings"] if s["name"] == "destination")
    assert [option["value"] for option in destination["options"]] == [p.lower() for p in platforms]
