"""Start a child Python process that loads a buffer, and read what it wrote to stderr.

The process tests run a ``CHILD`` script with ``sys.executable -c``; it prints
``loaded`` once it has accepted enough events. Its stderr goes to
``child.stderr`` in the test's ``tmp_path``, shown when an assertion fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream


async def start_until_loaded(
    script: str, args: list[str], tmp_path: Path, *, timeout: float
) -> Process:
    """Start ``script`` with ``args`` and return once it prints ``loaded``.

    The child is killed if it does not say so within ``timeout`` seconds.
    """
    stderr = (tmp_path / "child.stderr").open("ab")
    process = await anyio.open_process(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.DEVNULL,
        stderr=stderr,
    )
    stderr.close()
    assert process.stdout is not None
    try:
        with anyio.fail_after(timeout):
            line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 100)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    assert line == b"loaded", child_output(tmp_path)
    return process


def child_output(tmp_path: Path) -> str:
    """The last part of what the child wrote to stderr, for a failure message."""
    path = tmp_path / "child.stderr"
    return path.read_text(errors="replace")[-3_000:] if path.exists() else ""
