"""A buffer entered but never left says so (ResourceWarning), as an unclosed file does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

NEVER_LEFT = """
import asyncio, gc, sys
sys.path.insert(0, {tests!r})
from memory_sink import MemorySink
from analytics_buffer import AnalyticsBuffer, Settings

async def main() -> None:
    buffer = AnalyticsBuffer(Settings(data_dir={data!r}), sink=MemorySink())
    await buffer.__aenter__()  # and never __aexit__

asyncio.run(main())  # ends the loop, cancelling the buffer's tasks
gc.collect()
"""

LEFT = NEVER_LEFT.replace(
    "await buffer.__aenter__()  # and never __aexit__", "async with buffer:\n        pass"
)


def run(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    source = script.format(tests=str(TESTS), data=str(tmp_path))
    return subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", source],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_buffer_never_left_warns(tmp_path: Path) -> None:
    result = run(NEVER_LEFT, tmp_path)
    assert "ResourceWarning: AnalyticsBuffer was never closed" in result.stderr, result.stderr


def test_a_buffer_left_properly_does_not_warn(tmp_path: Path) -> None:
    result = run(LEFT, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "AnalyticsBuffer was never closed" not in result.stderr
