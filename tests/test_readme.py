"""The README stays true to the code: its commands and its settings table."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from analytics_buffer import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_starts_with_the_demo_and_the_test_command() -> None:
    first_block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    commands = first_block.strip().splitlines()
    assert len(commands) == 2
    assert commands[0].endswith("uv run --frozen analytics-buffer demo")
    assert commands[1].endswith("uv run --frozen pytest")
    ci = (README.parent / ".ci" / "run").read_text()
    assert ci.rstrip().endswith("uv run --frozen pytest")


def test_every_setting_is_in_the_settings_table() -> None:
    section = README.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    table = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
    fields = {field.name for field in msgspec.structs.fields(Settings)}
    assert fields <= table, f"missing from the README: {sorted(fields - table)}"
    assert not table - fields, f"not settings: {sorted(table - fields)}"
