"""What the Redis adapters share: the client they open and how its errors map."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ._exceptions import StoreUnavailable

__all__ = ("connect", "map_exceptions")


def connect(url: str, socket_timeout: float) -> Redis:
    """A client for ``url`` whose own retries are off: the caller decides what to retry."""
    return Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
    )


@contextmanager
def map_exceptions(action: str) -> Iterator[None]:
    """Turn redis-py's errors into :class:`~analytics_buffer.StoreUnavailable`.

    Connection failures, timeouts, a server still loading its data
    (``BusyLoadingError``) are what the name says. Other server errors (a
    full memory, a read-only replica, a key of the wrong type) are wrapped
    too, so no driver error leaves the adapter; the message says which.

    :param action: what was being done, for the message
    """
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise StoreUnavailable(f"redis unreachable during {action}: {exc}") from exc
    except redis_errors.RedisError as exc:
        raise StoreUnavailable(f"redis refused {action}: {exc}") from exc
