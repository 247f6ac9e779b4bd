"""The public surface: ``analytics_buffer.__all__`` and the exception tree."""

from __future__ import annotations

import ast
import importlib
import inspect
import pickle
import types
from pathlib import Path

import pytest

import analytics_buffer
from analytics_buffer import (
    AnalyticsBufferError,
    InvalidEvent,
    PermanentSinkError,
    TransientSinkError,
)
from analytics_buffer import _exceptions as exceptions_module

PUBLIC = tuple(analytics_buffer.__all__)


def _reexports() -> dict[str, str]:
    """``name -> private module`` for every ``from ._x import Name as Name`` in __init__."""
    tree = ast.parse(Path(analytics_buffer.__file__).read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                if node.module.startswith("_"):
                    found[alias.asname or alias.name] = node.module
    return found


REEXPORTS = _reexports()
EXCEPTIONS = [
    value
    for name in PUBLIC
    if isinstance(value := getattr(analytics_buffer, name), type)
    and issubclass(value, BaseException)
]


def test_all_has_no_duplicates_and_is_sorted() -> None:
    assert len(set(PUBLIC)) == len(PUBLIC)
    assert list(PUBLIC) == sorted(PUBLIC)


def test_all_matches_the_public_names_defined() -> None:
    defined = {
        name
        for name, value in vars(analytics_buffer).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert defined == set(PUBLIC)
    assert set(REEXPORTS) == set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_what_its_private_module_defines(name: str) -> None:
    module = importlib.import_module(f"analytics_buffer.{REEXPORTS[name]}")
    value = getattr(analytics_buffer, name)
    assert getattr(module, name) is value
    assert name in module.__all__
    namespace: dict[str, object] = {}
    exec(f"from analytics_buffer import {name}", namespace)
    assert namespace[name] is value


@pytest.mark.parametrize("name", PUBLIC)
def test_classes_and_functions_show_the_public_module(name: str) -> None:
    value = getattr(analytics_buffer, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__module__ == "analytics_buffer"
        assert value.__qualname__ == name
        assert value.__doc__, f"{name} has no docstring"


def test_the_exception_list_is_complete() -> None:
    assert {cls.__name__ for cls in EXCEPTIONS} == set(exceptions_module.__all__)
    assert len(EXCEPTIONS) >= 13


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_exceptions_derive_from_analytics_buffer_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, AnalyticsBufferError)
    assert issubclass(cls, Exception)


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_exception_docstrings_open_with_one_raised_when_line(cls: type[BaseException]) -> None:
    doc = inspect.getdoc(cls)
    assert doc, f"{cls.__name__} has no docstring"
    summary = doc.split("\n\n")[0]
    assert "\n" not in summary, f"{cls.__name__}: the summary is not one line: {summary!r}"
    assert summary.startswith(("Raised when ", "Raised for ")), summary
    assert summary.endswith("."), summary


def test_the_value_errors_are_value_errors() -> None:
    assert issubclass(analytics_buffer.ConfigError, ValueError)
    assert issubclass(analytics_buffer.InvalidEvent, ValueError)
    assert issubclass(analytics_buffer.InvalidArgument, ValueError)
    assert issubclass(analytics_buffer.CallTimeout, TimeoutError)


def test_exception_attributes() -> None:
    invalid = InvalidEvent("name", "must be a non-empty string")
    assert (invalid.field, invalid.problem) == ("name", "must be a non-empty string")
    assert str(invalid) == "invalid event: name: must be a non-empty string"
    assert TransientSinkError("x").possibly_persisted is False
    assert TransientSinkError("x", possibly_persisted=True).possibly_persisted is True
    assert PermanentSinkError("x").code == 0
    assert PermanentSinkError("x", code=16).code == 16


@pytest.mark.parametrize(
    ("error", "attributes"),
    [
        pytest.param(
            InvalidEvent("name", "must be a non-empty string"),
            ("field", "problem"),
            id="InvalidEvent",
        ),
        pytest.param(
            TransientSinkError("reset", possibly_persisted=True),
            ("possibly_persisted",),
            id="TransientSinkError",
        ),
        pytest.param(PermanentSinkError("Code: 16", code=16), ("code",), id="PermanentSinkError"),
    ],
)
def test_exceptions_survive_pickling_with_their_attributes(
    error: Exception, attributes: tuple[str, ...]
) -> None:
    # Fixed bug (_exceptions.py InvalidEvent.__init__): BaseException.__reduce__
    # replays ``args``, which holds only the formatted message, into an __init__
    # that needs (field, problem): InvalidEvent cannot be unpickled (nor
    # copy.copy'd), e.g. across a process pool. Fix: define
    # ``__reduce__`` returning ``(InvalidEvent, (self.field, self.problem))``.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    for name in attributes:
        assert getattr(copy, name) == getattr(error, name), name
