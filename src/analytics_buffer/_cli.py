"""The ``analytics-buffer`` command line (also ``python -m analytics_buffer``).

Subcommands live in one registry, :data:`COMMANDS`: a subcommand is a
:class:`Command` (name, help line, a function adding its arguments, an async
handler returning the exit status) added with :func:`register`. Handlers run
on anyio's asyncio backend (asynch needs it).

Settings come from the ``ANALYTICS_BUFFER_*`` environment variables, then
from the options (``--clickhouse-url``, ``--table``, ``--data-dir``).

Exit status: 0 on success, 1 when the storage fails, 2 for a configuration
or usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import anyio
import msgspec

from . import _outbox_cli
from ._exceptions import AnalyticsBufferError, ConfigError
from ._rollup import counters_ddl, counters_table
from ._schema import Capabilities, events_ddl
from ._settings import Settings

__all__ = ("COMMANDS", "Command", "main", "register")


class Command(NamedTuple):
    """One subcommand of ``analytics-buffer``."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    """Adds the subcommand's arguments to its parser."""
    run: Callable[[argparse.Namespace], Awaitable[int]]
    """Does the work; returns the exit status."""


COMMANDS: dict[str, Command] = {}
"""The subcommands by name, in the order ``--help`` lists them."""


def register(command: Command) -> Command:
    """Add ``command`` to :data:`COMMANDS` (a name can be registered once)."""
    if command.name in COMMANDS:
        raise ValueError(f"subcommand {command.name!r} is already registered")
    COMMANDS[command.name] = command
    return command


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options choosing the storage: ``--clickhouse-url``, ``--table``, ``--data-dir``."""
    parser.add_argument(
        "--clickhouse-url",
        metavar="URL",
        help="clickhouse://user:password@host:port/database (default: the embedded engine)",
    )
    parser.add_argument("--table", metavar="NAME", help="the events table (default: events)")
    parser.add_argument("--data-dir", metavar="DIR", help="the embedded engine's data directory")


def settings_from(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Return the settings of the environment, overridden by the engine options given."""
    for name in ("clickhouse_url", "table", "data_dir"):
        value = getattr(args, name, None)
        if value is not None:
            overrides.setdefault(name, value)
    return Settings.from_env(**overrides)


# --- schema ---------------------------------------------------------------


def _configure_schema(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument(
        "--apply",
        action="store_true",
        help="create the table (if it does not exist) and check that it fits the events",
    )


async def _capabilities(settings: Settings, *, apply: bool) -> Capabilities:
    if settings.clickhouse_url:
        from ._clickhouse import ClickHouseSink

        server = ClickHouseSink(settings, create_table=apply)
        try:
            if not apply:
                return await server.fetch_capabilities()
            await server.open()
            assert server.capabilities is not None
            return server.capabilities
        finally:
            await server.aclose()
    from ._chdb import ChdbSink, embedded_capabilities

    if not apply:
        return embedded_capabilities()
    embedded = ChdbSink(settings)
    try:
        await embedded.open()
        assert embedded.capabilities is not None
        return embedded.capabilities
    finally:
        await embedded.aclose()


async def _run_schema(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    caps = await _capabilities(settings, apply=args.apply)
    engine = "ClickHouse" if settings.clickhouse_url else "chdb (embedded ClickHouse)"
    print(f"-- the events table for {engine} {caps.version}")
    print(f"{events_ddl(settings.table, caps)};")
    counters = counters_table(settings.table)
    print(f"-- the counters' rollups (see README, Counters)\n{counters_ddl(counters, caps)};")
    if args.apply:
        await _apply_counters(settings, counters)
        print(f"-- applied: table {settings.table!r} exists and fits the events", file=sys.stderr)
        print(f"-- applied: table {counters!r} exists", file=sys.stderr)
    return 0


async def _apply_counters(settings: Settings, table: str) -> None:
    from ._engines import create_sink
    from ._rollup import SinkRollups, TupleSink

    sink = create_sink(settings)
    try:
        assert isinstance(sink, TupleSink)
        await SinkRollups(sink, table).prepare()
    finally:
        await sink.aclose()


register(
    Command(
        "schema",
        "print the events table's DDL for the server's version (--apply creates it)",
        _configure_schema,
        _run_schema,
    )
)

# --- demo -----------------------------------------------------------------


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument(
        "--events", type=int, default=200_000, metavar="N", help="events to track (200000)"
    )
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help="redis://host:port/db for session state (default: memory)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object, no progress")


async def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import format_summary, run_demo

    if args.events < 1:
        raise ConfigError(f"--events must be at least 1, got {args.events}")
    overrides = {} if args.redis_url is None else {"redis_url": args.redis_url}
    settings = settings_from(args, **overrides)
    summary = await run_demo(settings, args.events, progress=None if args.json else sys.stderr)
    print(msgspec.json.encode(summary).decode() if args.json else format_summary(summary))
    stored = summary.written + summary.dead_lettered >= summary.accepted
    return 0 if stored and summary.counted_events == summary.accepted else 1


register(
    Command(
        "demo",
        "track synthetic traffic through the whole pipeline and count it back",
        _configure_demo,
        _run_demo,
    )
)


# --- outbox -----------------------------------------------------------------

register(
    Command(
        "outbox",
        "the disk outbox: status (size, segments, age), replay now, inspect records",
        _outbox_cli.configure,
        _outbox_cli.run,
    )
)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="analytics-buffer",
        description="Tools for analytics-buffer's storage.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        return anyio.run(command.run, args, backend="asyncio")
    except ConfigError as exc:
        print(f"analytics-buffer {command.name}: {exc}", file=sys.stderr)
        return 2
    except AnalyticsBufferError as exc:
        print(f"analytics-buffer {command.name}: {exc}", file=sys.stderr)
        return 1
