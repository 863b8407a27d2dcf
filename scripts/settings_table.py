"""Write the settings table of `target-usage-billing --about --format=markdown` into README.md.

`python scripts/settings_table.py` rewrites the block between the settings-table markers;
`--check` exits 1 when the README is out of date (a test runs that).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- settings-table:start"
END = "<!-- settings-table:end -->"


def settings_table() -> str:
    about = subprocess.run(
        [str(Path(sys.executable).parent / "target-usage-billing"), "--about", "--format=markdown"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    section = about.split("## Settings", 1)[1]
    lines = [line for line in section.strip().splitlines() if line.startswith("|")]
    return "\n".join(lines)


def render(readme: str, table: str) -> str:
    head, rest = readme.split(START, 1)
    marker_line, _old = rest.split("\n", 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}{marker_line}\n{table}\n{END}{tail}"


def main() -> None:
    readme = README.read_text()
    updated = render(readme, settings_table())
    if "--check" in sys.argv:
        if updated != readme:
            sys.exit("README.md settings table is out of date: run `make docs`")
        return
    README.write_text(updated)


if __name__ == "__main__":
    main()
