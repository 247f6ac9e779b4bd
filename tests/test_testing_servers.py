"""Tests of ``analytics_buffer.testing``: the launchers really start, stop and recover servers."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio
from asynch import Connection

from analytics_buffer.testing import ClickHouseServer, RedisServer, ServerUnavailable, _servers


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """A port on 127.0.0.1 that is already taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


# -- ClickHouse ---------------------------------------------------------------------


def test_clickhouse_answers_queries(clickhouse_server: ClickHouseServer) -> None:
    assert clickhouse_server.running
    assert clickhouse_server.query("SELECT 1") == [(1,)]
    assert (
        clickhouse_server.url == f"clickhouse://default:@127.0.0.1:{clickhouse_server.port}/default"
    )
    assert clickhouse_server.url_for("x").endswith(f":{clickhouse_server.port}/x")
    # The config pins the server time zone, so DateTime values read the same everywhere.
    assert clickhouse_server.query("SELECT timezone()")[0][0] in {"UTC", "Etc/UTC"}


@pytest.mark.anyio
async def test_clickhouse_url_is_a_private_database(clickhouse_url: str) -> None:
    database = clickhouse_url.rsplit("/", 1)[1]
    assert database.startswith("t_")
    async with Connection(dsn=clickhouse_url) as connection, connection.cursor() as cursor:
        await cursor.execute(
            "SELECT currentDatabase(), count() FROM system.tables "
            "WHERE database = currentDatabase()"
        )
        assert await cursor.fetchall() == [(database, 0)]


def test_clickhouse_kill_and_restart_keep_data(private_clickhouse: ClickHouseServer) -> None:
    ch = private_clickhouse
    port = ch.port
    ch.query("CREATE TABLE events (id UInt32) ENGINE = MergeTree ORDER BY id")
    ch.query("INSERT INTO events (id) VALUES", [(1,), (2,), (3,)])
    pid = ch.pid
    assert pid is not None

    ch.kill()
    assert not ch.running
    assert not _process_exists(pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    ch.start()
    assert ch.port == port
    assert ch.query("SELECT count() FROM events") == [(3,)]

    ch.restart()
    assert ch.pid != pid
    assert ch.query("SELECT sum(id) FROM events") == [(6,)]


def test_clickhouse_pause_stalls_queries_until_resume(
    private_clickhouse: ClickHouseServer,
) -> None:
    ch = private_clickhouse
    ch.pause()
    assert ch.paused
    with pytest.raises(TimeoutError):
        ch.query("SELECT 1", timeout=0.5)
    ch.resume()
    assert not ch.paused
    assert ch.query("SELECT 1") == [(1,)]


def test_clickhouse_stop_while_paused(private_clickhouse: ClickHouseServer) -> None:
    pid = private_clickhouse.pid
    assert pid is not None
    private_clickhouse.pause()
    private_clickhouse.stop()
    assert not private_clickhouse.running
    assert not _process_exists(pid)


# -- Redis --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_redis_url_is_flushed_and_usable(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.dbsize() == 0
        await client.set("key", "value")
        assert await client.get("key") == b"value"
    finally:
        await client.aclose()
    assert redis_server.command("DBSIZE") == b":1"
    redis_server.flushall()
    assert redis_server.command("DBSIZE") == b":0"


def test_redis_restart_without_persistence_starts_empty(private_redis: RedisServer) -> None:
    port = private_redis.port
    assert private_redis.command("SET", "k", "v") == b"+OK"
    private_redis.restart()
    assert private_redis.port == port
    assert private_redis.ping()
    assert private_redis.command("DBSIZE") == b":0"


def test_redis_appendonly_survives_kill() -> None:
    with RedisServer(appendonly=True) as server:
        assert server.command("SET", "k", "v") == b"+OK"
        server.kill()
        assert not server.ping()
        server.start()
        assert server.command("EXISTS", "k") == b":1"


def test_redis_pause_stalls_commands_until_resume(private_redis: RedisServer) -> None:
    private_redis.pause()
    with pytest.raises(TimeoutError):
        private_redis.command("PING", timeout=0.3)
    assert not private_redis.ping(timeout=0.1)
    private_redis.resume()
    assert private_redis.ping()


# -- Both ---------------------------------------------------------------------------


@pytest.mark.parametrize("server_class", [ClickHouseServer, RedisServer])
def test_context_manager_reaps_process_and_directory(
    server_class: type[ClickHouseServer | RedisServer],
) -> None:
    class Boom(Exception):
        pass

    # A paused server inside a failing test is the worst case for clean-up.
    with pytest.raises(Boom), server_class() as server:  # noqa: PT012
        pid = server.pid
        directory = server.directory
        server.pause()
        raise Boom
    assert pid is not None
    assert not _process_exists(pid)
    assert not directory.exists()
    server.close()  # a second close is harmless


@pytest.mark.parametrize(
    ("server_class", "package"),
    [(ClickHouseServer, "clickhouse-server"), (RedisServer, "redis-server")],
)
def test_missing_binary_names_the_debian_package(
    server_class: type[ClickHouseServer | RedisServer],
    package: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_servers, "_SBIN_DIRS", ())
    hint = f"install the Debian package '{package}' (apt-get install {package})"
    with pytest.raises(ServerUnavailable, match=rf"^{package} not found: ") as info:
        server_class()
    assert hint in str(info.value)

    with pytest.raises(ServerUnavailable, match="not found at /nonexistent/") as info:
        server_class(binary=f"/nonexistent/{package}")
    assert hint in str(info.value)


def test_taken_fixed_port_fails_with_log_tail(listening_socket: socket.socket) -> None:
    port = listening_socket.getsockname()[1]
    server = RedisServer(port=port)
    with pytest.raises(ServerUnavailable, match="exited with code") as info:
        server.start()
    assert "redis.log" in str(info.value)
    assert not server.running
    server.close()


def test_taken_automatic_port_is_replaced(
    listening_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = listening_socket.getsockname()[1]
    real_free_port = _servers.free_port
    ports = iter([taken])
    monkeypatch.setattr(_servers, "free_port", lambda host: next(ports, None) or real_free_port())
    with ClickHouseServer() as ch:
        assert ch.port != taken
        assert ch.query("SELECT 1") == [(1,)]


@pytest.mark.anyio
async def test_query_works_inside_a_running_event_loop(clickhouse_server: ClickHouseServer) -> None:
    # Benchmarks call the blocking helpers from ``async def main``: asyncio.run()
    # cannot nest, so the query runs on a private loop in a thread.
    assert clickhouse_server.query("SELECT 2") == [(2,)]
