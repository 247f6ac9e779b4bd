"""Real servers for tests and benchmarks: throwaway ClickHouse and Redis processes.

The test suite's fixtures and the ``benchmarks/`` scripts both start their servers with
these classes, so a fault test can kill, pause and restart a real server::

    from analytics_buffer.testing import ClickHouseServer, RedisServer

    with ClickHouseServer() as ch, RedisServer() as redis:
        ...  # ch.url, redis.url

They need the Debian packages ``clickhouse-server`` and ``redis-server``; without them
they raise :exc:`ServerUnavailable` naming the package to install.
"""

from __future__ import annotations

from ._servers import ClickHouseServer as ClickHouseServer
from ._servers import RedisServer as RedisServer
from ._servers import ServerUnavailable as ServerUnavailable
from ._servers import free_port as free_port

__all__ = ("ClickHouseServer", "RedisServer", "ServerUnavailable", "free_port")

for _obj in (ClickHouseServer, RedisServer, ServerUnavailable, free_port):
    _obj.__module__ = __name__
del _obj
