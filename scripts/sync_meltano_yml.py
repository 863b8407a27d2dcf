"""Rewrite the target's settings in meltano.yml from `--about` (comments elsewhere kept).

python scripts/sync_meltano_yml.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from meltano_settings import expected_settings

PROJECT = Path(__file__).resolve().parent.parent / "meltano.yml"
INDENT = "    "


def main() -> None:
    lines = PROJECT.read_text().splitlines(keepends=True)
    start = lines.index("  - name: target-usage-billing\n")
    head = next(i for i in range(start, len(lines)) if lines[i] == f"{INDENT}settings:\n") + 1
    end = next(
        i
        for i in range(head, len(lines))
        if not lines[i].startswith(f"{INDENT}- ") and not lines[i].startswith(f"{INDENT}  ")
    )
    block = yaml.safe_dump(expected_settings(), sort_keys=False, allow_unicode=True, width=100)
    new = [f"{INDENT}{line}\n" for line in block.splitlines()]
    PROJECT.write_text("".join(lines[:head] + new + lines[end:]))


if __name__ == "__main__":
    main()
