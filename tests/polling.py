"""Waiting in the integration tests for a condition that has no event of its own."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest


async def wait_until(
    predicate: Callable[[], bool], what: str, *, timeout: float = 10.0, every: float = 0.01
) -> None:
    """Poll ``predicate`` every ``every`` seconds for at most ``timeout``; fail naming ``what``.

    Only for conditions a test cannot wait on otherwise, such as a counter
    in ``stats()`` (a retry shows only in ``stats().retries``).
    """
    try:
        with anyio.fail_after(timeout):
            while not predicate():  # noqa: ASYNC110 (nothing to wait on but the condition)
                await anyio.sleep(every)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout} s waiting for {what}")
