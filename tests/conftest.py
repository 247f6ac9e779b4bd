"""Shared fixtures: real ClickHouse and Redis servers, and the default anyio backend.

One ClickHouse and one Redis server are shared by the whole run; each test gets its own
ClickHouse database (``clickhouse_url``) or a flushed Redis (``redis_url``). Fault tests
that kill, pause or restart a server take a private one (``private_clickhouse``,
``private_redis``) instead. Tests using any of these are marked ``integration``
automatically, so ``pytest -m "not integration"`` runs the rest without servers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from analytics_buffer.testing import ClickHouseServer, RedisServer

_SERVER_FIXTURES = frozenset(
    {
        "clickhouse_server",
        "clickhouse_url",
        "private_clickhouse",
        "redis_server",
        "redis_url",
        "private_redis",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Run async tests on asyncio unless a test parametrizes ``anyio_backend`` itself.

    Module scope, as in anyio's own plugin, so module-scoped async fixtures work.
    """
    return "asyncio"


@pytest.fixture(scope="session")
def clickhouse_server() -> Iterator[ClickHouseServer]:
    """One ClickHouse server for the whole run; do not stop or pause it."""
    with ClickHouseServer() as server:
        yield server


@pytest.fixture
def clickhouse_url(clickhouse_server: ClickHouseServer) -> Iterator[str]:
    """URL of a fresh database ``t_<hex>`` on the shared server, dropped afterwards."""
    database = f"t_{uuid.uuid4().hex}"
    clickhouse_server.query(f"CREATE DATABASE {database}")
    yield clickhouse_server.url_for(database)
    clickhouse_server.query(f"DROP DATABASE IF EXISTS {database}")


@pytest.fixture
def private_clickhouse() -> Iterator[ClickHouseServer]:
    """A ClickHouse server of the test's own, free to kill, pause and restart."""
    with ClickHouseServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis server for the whole run; do not stop or pause it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the shared Redis server, emptied (``FLUSHALL``) before the test."""
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis server of the test's own, free to kill, pause and restart."""
    with RedisServer() as server:
        yield server
