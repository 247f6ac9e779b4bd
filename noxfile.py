"""Developer sessions: ``uv run nox`` runs lint, types and tests; ``uv run nox -s bench``.

Every session installs exactly what ``uv.lock`` pins (``uv sync --frozen`` into the
session's virtualenv), so nox checks the same versions as CI and ``uv run``.
Arguments after ``--`` go to the tool, e.g. ``uv run nox -s tests -- -k redis -x``.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "types", "tests"]

ROOT = Path(__file__).parent


def sync(session: nox.Session, *args: str) -> None:
    """Install the locked dependencies into the session's virtualenv."""
    session.run_install(
        "uv",
        "sync",
        "--frozen",
        *args,
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )


def tests_impl(session: nox.Session, *args: str) -> None:
    """Install the project with its dev group and run pytest with ``args``."""
    sync(session)
    session.run("pytest", *args, *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (it starts its own ClickHouse and Redis servers)."""
    tests_impl(session, "--durations=10")


@nox.session
def lint(session: nox.Session) -> None:
    """Check lint and formatting with ruff."""
    # The linters need only the dev group, not an installed project.
    sync(session, "--only-group", "dev")
    session.run("ruff", "check", *session.posargs)
    session.run("ruff", "format", "--check", *session.posargs)


@nox.session
def types(session: nox.Session) -> None:
    """Type-check src, tests, benchmarks and this file (``[tool.mypy]`` is strict)."""
    sync(session)
    session.run("mypy", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run every script in ``benchmarks/`` with ``--json``, throughput first.

    Each script starts its own servers unless it is given URLs; ``posargs`` are
    passed to every script.
    """
    sync(session)
    scripts = sorted(
        (ROOT / "benchmarks").glob("[!_]*.py"),
        key=lambda path: (path.name != "throughput.py", path.name),
    )
    if not scripts:
        session.error("no benchmark scripts in benchmarks/")
    for script in scripts:
        session.run("python", str(script.relative_to(ROOT)), "--json", *session.posargs)
