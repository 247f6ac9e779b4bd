"""``analytics-buffer schema``: the DDL for the server's version, and ``--apply``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import analytics_buffer
from analytics_buffer._cli import COMMANDS, Command, build_parser, main, register
from analytics_buffer._settings import ENV_PREFIX
from analytics_buffer.testing import ClickHouseServer, free_port


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command reads ANALYTICS_BUFFER_* variables: start every test without them."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def test_embedded_schema_is_the_modern_ddl(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("-- the events table for chdb (embedded ClickHouse) 26.")
    assert "CREATE TABLE IF NOT EXISTS `events`" in out
    assert "`properties` Map(String, String)" in out
    assert "DateTime64(3, 'UTC')" in out
    assert out.rstrip().endswith("non_replicated_deduplication_window = 1000;")


def test_schema_of_the_1816_server_creates_nothing(
    clickhouse_url: str, clickhouse_server: ClickHouseServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", "--clickhouse-url", clickhouse_url, "--table", "page_events"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("-- the events table for ClickHouse 18.16.1\n")
    assert "CREATE TABLE IF NOT EXISTS `page_events`" in out
    assert "`created_at_ms` UInt16" in out
    assert "Nested(key String, value String)" in out
    assert "LowCardinality" not in out
    tables = clickhouse_server.query(
        f"SELECT name FROM system.tables WHERE database = '{database_of(clickhouse_url)}'"
    )
    assert tables == []


def test_apply_creates_the_table_on_1816(
    clickhouse_url: str, clickhouse_server: ClickHouseServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", "--clickhouse-url", clickhouse_url, "--apply"]) == 0
    captured = capsys.readouterr()
    assert "applied: table 'events'" in captured.err
    columns = clickhouse_server.query(
        "SELECT name, type FROM system.columns "
        f"WHERE database = '{database_of(clickhouse_url)}' AND table = 'events'"
    )
    assert ("created_at", "DateTime('UTC')") in columns
    assert ("properties.value", "Array(String)") in columns
    # Applying again is harmless: IF NOT EXISTS, and the table still fits.
    assert main(["schema", "--clickhouse-url", clickhouse_url, "--apply"]) == 0


def test_apply_reports_a_table_that_does_not_fit(
    clickhouse_url: str, clickhouse_server: ClickHouseServer, capsys: pytest.CaptureFixture[str]
) -> None:
    clickhouse_server.query(
        "CREATE TABLE events (id UUID, name String) ENGINE = MergeTree() ORDER BY id",
        database=database_of(clickhouse_url),
    )
    assert main(["schema", "--clickhouse-url", clickhouse_url, "--apply"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("analytics-buffer schema: table 'events' does not fit the events")
    assert "project_id" in err


def test_apply_creates_the_embedded_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", "--apply", "--data-dir", str(tmp_path), "--table", "ev"]) == 0
    assert "CREATE TABLE IF NOT EXISTS `ev`" in capsys.readouterr().out
    assert (tmp_path / "chdb").is_dir()
    # The table is there: a second apply opens it and checks its columns.
    assert main(["schema", "--apply", "--data-dir", str(tmp_path), "--table", "ev"]) == 0


def test_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}TABLE", "from_env")
    assert main(["schema"]) == 0
    assert "`from_env`" in capsys.readouterr().out
    assert main(["schema", "--table", "from_option"]) == 0
    assert "`from_option`" in capsys.readouterr().out


def test_unreachable_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"clickhouse://default:@127.0.0.1:{free_port()}/default"
    assert main(["schema", "--clickhouse-url", url]) == 1
    assert "unreachable" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments",
    [
        ["schema", "--clickhouse-url", "http://127.0.0.1:8123/"],
        ["schema", "--table", "bad name"],
    ],
)
def test_configuration_errors_exit_2(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(arguments) == 2
    assert capsys.readouterr().err.startswith("analytics-buffer schema: ")


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main([])
    assert raised.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_commands_come_from_the_registry() -> None:
    assert "schema" in COMMANDS
    with pytest.raises(ValueError, match="already registered"):
        register(COMMANDS["schema"])

    async def run(args: argparse.Namespace) -> int:
        return 0 if args.flag else 3

    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--flag", action="store_true")

    register(Command("probe", "a test command", configure, run))
    try:
        assert "probe" in build_parser().format_help()
        assert main(["probe", "--flag"]) == 0
        assert main(["probe"]) == 3
    finally:
        del COMMANDS["probe"]


def test_python_dash_m_runs_the_command_line() -> None:
    source = Path(analytics_buffer.__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "analytics_buffer", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "schema" in done.stdout
