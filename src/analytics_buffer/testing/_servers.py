"""Throwaway ``clickhouse-server`` and ``redis-server`` processes for tests and benchmarks.

Each server runs on a free ``127.0.0.1`` port with its data in a private temporary
directory, in its own session (process group), so a test can kill, pause and restart it
without touching anything else on the machine. The process is always reaped: by
:meth:`~_Server.close` (called by the context manager), and as a last resort by a
finalizer when the object is garbage collected or the interpreter exits.

This is test infrastructure, not library code: it blocks, uses :mod:`subprocess` and
polls with short :func:`time.sleep` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar
from xml.sax.saxutils import escape

from asynch import Connection

__all__ = ("ClickHouseServer", "RedisServer", "ServerUnavailable", "free_port")

_T = TypeVar("_T")

#: Searched after ``PATH``: server binaries live in ``sbin``, which a non-root ``PATH``
#: often lacks.
_SBIN_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/sbin", "/sbin")

_POLL_INTERVAL = 0.05
_LOG_TAIL_LINES = 25


class ServerUnavailable(RuntimeError):
    """Raised when a test server cannot be found, started or reached."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    Another process may take it before the server binds it; :meth:`_Server.start`
    retries with a new port when the first start fails that way.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _find_binary(name: str, package: str, binary: str | os.PathLike[str] | None) -> str:
    hint = f"install the Debian package {package!r} (apt-get install {package})"
    if binary is not None:
        path = os.fspath(binary)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        raise ServerUnavailable(f"{name} not found at {path}: {hint}")
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    found = shutil.which(name, path=search)
    if found is None:
        raise ServerUnavailable(f"{name} not found: {hint}")
    return found


def _run_coroutine(factory: Callable[[], Awaitable[_T]]) -> _T:
    """Run a coroutine to completion on a private event loop, from sync code.

    When the caller already runs an event loop (a benchmark's ``async def main``),
    :func:`asyncio.run` would refuse, so the private loop then runs in a thread.
    """

    async def main() -> _T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())

    outcome: list[_T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(asyncio.run(main()))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="analytics-buffer-testing")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class _State:
    """What the finalizer needs; it must not reference the server object itself."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: Path | None = None

    def signal(self, signum: int) -> None:
        process = self.process
        # Signal the group only while its leader is unreaped: once reaped, the
        # group id could belong to somebody else.
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)

    def reap(self, timeout: float | None = None) -> None:
        """Wait for the process; SIGKILL the group if it outlives ``timeout``."""
        process = self.process
        if process is None:
            return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.signal(signal.SIGKILL)
        self.reap()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


class _Server:
    """Shared lifecycle of a server process owned by a test."""

    _name: ClassVar[str]
    _package: ClassVar[str]
    _log_files: ClassVar[tuple[str, ...]]

    #: Host the server listens on.
    host: str = "127.0.0.1"

    def __init__(
        self,
        *,
        binary: str | os.PathLike[str] | None = None,
        port: int | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self._binary = _find_binary(self._name, self._package, binary)
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port(self.host)
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._paused = False
        #: Seconds the last :meth:`start` took until the server answered.
        self.startup_seconds: float | None = None
        self._state = _State()
        self._finalizer = weakref.finalize(self, self._state.cleanup)

    # -- to implement ---------------------------------------------------------------

    def _prepare(self, directory: Path) -> None:
        """Write the configuration into ``directory`` (called before every start)."""

    def _command(self, directory: Path) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> bool:
        """Return whether the server answers a real request right now."""
        raise NotImplementedError

    # -- properties -----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port, kept across restarts."""
        return self._port

    @property
    def binary(self) -> str:
        """Path of the server executable."""
        return self._binary

    @property
    def directory(self) -> Path:
        """The temporary directory holding configuration, data and logs.

        :raises RuntimeError: if the server was never started
        """
        if self._state.directory is None:
            raise RuntimeError(f"{self._name} has not been started")
        return self._state.directory

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or ``None``."""
        process = self._state.process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive (possibly paused)."""
        return self.pid is not None

    @property
    def paused(self) -> bool:
        """Whether the server is stopped with SIGSTOP."""
        return self._paused and self.running

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it answers requests.

        The first start creates the temporary directory; later starts reuse it and
        the port, so data on disk survives :meth:`stop`, :meth:`kill` and
        :meth:`restart`.

        :raises RuntimeError: if the server is already running
        :raises ServerUnavailable: if it does not become ready within
            ``startup_timeout``; the message ends with the tail of its logs
        """
        if self.running:
            raise RuntimeError(f"{self._name} is already running (pid {self.pid})")
        first_start = self._state.directory is None
        if first_start:
            self._state.directory = Path(tempfile.mkdtemp(prefix=f"{self._name}-"))
        # Only a port we picked ourselves may be changed: another process can grab
        # it between free_port() and the server's bind.
        attempts = 3 if first_start and not self._port_fixed else 1
        for attempt in range(attempts):
            try:
                self._start_once()
            except _EarlyExit:
                if attempt == attempts - 1:
                    raise
                self._port = free_port(self.host)
            else:
                return

    def _start_once(self) -> None:
        directory = self.directory
        self._prepare(directory)
        with open(directory / "console.log", "ab") as console:
            self._state.process = subprocess.Popen(
                self._command(directory),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=directory,
                start_new_session=True,
            )
        self._paused = False
        started = time.monotonic()
        deadline = started + self._startup_timeout
        while True:
            process = self._state.process
            assert process is not None
            if process.poll() is not None:
                self._state.process = None
                raise _EarlyExit(
                    f"{self._name} exited with code {process.returncode} during start-up "
                    f"on port {self._port}\n{self.log_tail()}"
                )
            if self._probe():
                self.startup_seconds = time.monotonic() - started
                return
            if time.monotonic() > deadline:
                self._state.signal(signal.SIGKILL)
                self._state.reap()
                raise ServerUnavailable(
                    f"{self._name} did not answer on {self.host}:{self._port} within "
                    f"{self._startup_timeout} s\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def stop(self) -> None:
        """Stop the server with SIGTERM and wait for it (SIGKILL after ``stop_timeout``).

        Does nothing if it is not running. A paused server is resumed so it can act
        on the SIGTERM.
        """
        self._state.signal(signal.SIGTERM)
        self._state.signal(signal.SIGCONT)
        self._state.reap(self._stop_timeout)
        self._paused = False

    def kill(self) -> None:
        """Kill the server with SIGKILL and wait for it: a crash, without shutdown."""
        self._state.signal(signal.SIGKILL)
        self._state.reap()
        self._paused = False

    def pause(self) -> None:
        """Freeze the server with SIGSTOP.

        The kernel still accepts connections on its port, but nothing answers until
        :meth:`resume`: requests hang rather than fail, like a stalled server.
        """
        if not self.running:
            raise RuntimeError(f"{self._name} is not running")
        self._state.signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Let a paused server continue (SIGCONT)."""
        self._state.signal(signal.SIGCONT)
        self._paused = False

    def restart(self) -> None:
        """Stop the server if it runs, then start it again on the same port and data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Kill the server and delete its temporary directory. Safe to call twice."""
        self._paused = False
        self._finalizer()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of each non-empty log file, for error messages."""
        directory = self._state.directory
        if directory is None:
            return ""
        parts = []
        for name in (*self._log_files, "console.log"):
            text = _tail(directory / name, lines)
            if text:
                parts.append(f"--- {name} (last {lines} lines) ---\n{text}")
        return "\n".join(parts) or "(no log output)"

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        status = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self._port} {status}>"


class _EarlyExit(ServerUnavailable):
    """The process exited during start-up (most often: its port was taken)."""


_CLICKHOUSE_CONFIG = """\
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{dir}/clickhouse-server.log</log>
        <errorlog>{dir}/clickhouse-server.err.log</errorlog>
        <console>0</console>
    </logger>
    <listen_host>{host}</listen_host>
    <tcp_port>{port}</tcp_port>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <format_schema_path>{dir}/format_schemas/</format_schema_path>
    <users_config>{dir}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>5368709</mark_cache_size>
{extra}
</yandex>
"""

_CLICKHOUSE_USERS = """\
<?xml version="1.0"?>
<yandex>
    <profiles><default></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>::/0</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default></default></quotas>
</yandex>
"""


class ClickHouseServer(_Server):
    """A throwaway ``clickhouse-server`` (Debian package ``clickhouse-server``).

    It listens for the native protocol only, on a free port of ``127.0.0.1``, with a
    passwordless ``default`` user and the server time zone set to UTC. It is ready
    when a ``SELECT 1`` through :mod:`asynch` succeeds.

    ::

        with ClickHouseServer() as ch:
            ch.query("CREATE DATABASE demo")
            url = ch.url_for("demo")

    :param binary: path of ``clickhouse-server``; by default it is looked up on
        ``PATH`` and then in the ``sbin`` directories
    :param port: TCP port for the native protocol; by default a free one
    :param startup_timeout: seconds to wait for the server to answer
    :param stop_timeout: seconds :meth:`stop` waits before it sends SIGKILL
    :param extra_config: raw XML inserted into ``config.xml``'s ``<yandex>`` root
    :raises ServerUnavailable: if the binary is missing
    """

    _name = "clickhouse-server"
    _package = "clickhouse-server"
    _log_files = ("clickhouse-server.err.log", "clickhouse-server.log")

    def __init__(
        self,
        *,
        binary: str | os.PathLike[str] | None = None,
        port: int | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        extra_config: str = "",
    ) -> None:
        super().__init__(
            binary=binary, port=port, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self._extra_config = extra_config

    @property
    def url(self) -> str:
        """Connection URL of the ``default`` database."""
        return self.url_for("default")

    def url_for(self, database: str) -> str:
        """Return the connection URL of ``database`` on this server."""
        return f"clickhouse://default:@{self.host}:{self._port}/{database}"

    def query(
        self,
        sql: str,
        args: Sequence[Any] | None = None,
        *,
        database: str = "default",
        timeout: float = 10.0,
    ) -> list[tuple[Any, ...]]:
        """Run one statement through :mod:`asynch` and return its rows.

        A convenience for fixtures and assertions; it opens a new connection per
        call. Pass inserted rows as ``args``
        (``query("INSERT INTO t (x) VALUES", [(1,), (2,)])``): over the native
        protocol, rows written inline after ``VALUES`` make the driver wait forever.

        :param sql: the statement
        :param args: rows for an ``INSERT``, or query parameters
        :param database: the database to run it in
        :param timeout: seconds for connecting and running it together
        :raises TimeoutError: if the server does not answer in time (for example
            while it is paused)
        """
        return _run_coroutine(lambda: self._query(sql, args, database, timeout))

    async def _query(
        self, sql: str, args: Sequence[Any] | None, database: str, timeout: float
    ) -> list[tuple[Any, ...]]:
        async with asyncio.timeout(timeout):
            connection = Connection(dsn=self.url_for(database), connect_timeout=timeout)
            try:
                await connection.connect()
                async with connection.cursor() as cursor:
                    await cursor.execute(sql, args)
                    if cursor.description is None:
                        return []
                    rows: list[tuple[Any, ...]] = await cursor.fetchall()
                    return rows
            finally:
                await connection.close()

    def _prepare(self, directory: Path) -> None:
        values = {"dir": escape(str(directory)), "host": self.host, "port": self._port}
        (directory / "config.xml").write_text(
            _CLICKHOUSE_CONFIG.format(**values, extra=self._extra_config)
        )
        (directory / "users.xml").write_text(_CLICKHOUSE_USERS)

    def _command(self, directory: Path) -> list[str]:
        return [self._binary, f"--config-file={directory / 'config.xml'}"]

    def _probe(self) -> bool:
        # A cheap TCP check first, so the slower protocol round trip is only tried
        # once the port is open.
        try:
            socket.create_connection((self.host, self._port), timeout=1.0).close()
        except OSError:
            return False
        try:
            return self.query("SELECT 1", timeout=1.0) == [(1,)]
        except Exception:
            # Tables and the default database load after the port opens: a failing
            # query only means "not yet".
            return False


class RedisServer(_Server):
    """A throwaway ``redis-server`` (Debian package ``redis-server``).

    Persistence is off by default (``--save ""``, ``--appendonly no``), so a restart
    starts empty; with ``appendonly=True`` the append-only file keeps every
    acknowledged write across :meth:`kill` and :meth:`restart` (Redis writes it before
    it replies, so killing the process loses nothing). It is ready when ``PING``
    answers ``+PONG``.

    :param binary: path of ``redis-server``; by default it is looked up on ``PATH``
        and then in the ``sbin`` directories
    :param port: TCP port; by default a free one
    :param appendonly: turn on the append-only file
    :param extra_args: more command-line options, such as ``("--maxmemory", "10mb")``
    :param startup_timeout: seconds to wait for the server to answer
    :param stop_timeout: seconds :meth:`stop` waits before it sends SIGKILL
    :raises ServerUnavailable: if the binary is missing
    """

    _name = "redis-server"
    _package = "redis-server"
    _log_files = ("redis.log",)

    def __init__(
        self,
        *,
        binary: str | os.PathLike[str] | None = None,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            binary=binary, port=port, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self._appendonly = appendonly
        self._extra_args = tuple(extra_args)

    @property
    def url(self) -> str:
        """Connection URL of database 0."""
        return f"redis://{self.host}:{self._port}/0"

    def command(self, *args: str | bytes, timeout: float = 5.0) -> bytes:
        """Send one command and return the first line of the reply, without ``\\r\\n``.

        Enough for ``PING``, ``FLUSHALL`` or ``DBSIZE`` (``b"+OK"``, ``b":3"``); use
        redis-py for anything that returns bulk data.

        :raises TimeoutError: if the server does not answer in time
        :raises ConnectionError: if it refuses the connection or hangs up
        """
        parts = [arg.encode() if isinstance(arg, str) else arg for arg in args]
        request = b"".join(
            [f"*{len(parts)}\r\n".encode()]
            + [b"$%d\r\n%s\r\n" % (len(part), part) for part in parts]
        )
        with socket.create_connection((self.host, self._port), timeout=timeout) as sock:
            sock.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"redis-server on port {self._port} hung up")
                reply += chunk
        return reply.split(b"\r\n", 1)[0]

    def ping(self, timeout: float = 1.0) -> bool:
        """Return whether ``PING`` gets ``+PONG`` within ``timeout`` seconds."""
        try:
            return self.command("PING", timeout=timeout) == b"+PONG"
        except OSError:
            return False

    def flushall(self) -> None:
        """Delete every key in every database."""
        reply = self.command("FLUSHALL")
        if reply != b"+OK":
            raise ServerUnavailable(f"FLUSHALL failed: {reply!r}")

    def _command(self, directory: Path) -> list[str]:
        return [
            self._binary,
            "--port", str(self._port),
            "--bind", self.host,
            "--dir", str(directory),
            "--logfile", str(directory / "redis.log"),
            "--loglevel", "warning",
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self._appendonly else "no",
            *self._extra_args,
        ]  # fmt: skip

    def _probe(self) -> bool:
        return self.ping(timeout=0.5)
