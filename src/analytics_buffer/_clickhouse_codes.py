"""ClickHouse error codes, classified once for both sinks (native and embedded).

A server error is *permanent* when retrying the same rows cannot succeed: the
table or a column is missing, a value does not parse or fit its type, the
query is malformed, or the credentials are refused. The Writer dead-letters
such a chunk with the code at once.

Every other code is *transient*: the server is overloaded (``TOO_MANY_PARTS``
252, ``MEMORY_LIMIT_EXCEEDED`` 241, ``TOO_MANY_SIMULTANEOUS_QUERIES`` 202),
restarting a table (``TABLE_IS_BEING_RESTARTED`` 733, ``TABLE_IS_READ_ONLY``
242), out of disk (243), or the network broke (209, 210). Codes not listed
here, including ones added by future servers, are transient too: a retry
with the same deduplication token is always safe, and the Writer bounds its
attempts, so the worst case of a wrong guess is a late dead letter rather
than a lost or duplicated chunk.

The numbers were read back from the server's own table
(``SELECT number, errorCodeToName(toUInt32(number)) FROM numbers(1200)``,
ClickHouse 26.9); the codes have been stable since 18.x.
"""

from __future__ import annotations

import re
from typing import Final

from ._exceptions import PermanentSinkError, SinkError, TransientSinkError

__all__ = ("PERMANENT_CODES", "code_in_message", "error_for_code")

PERMANENT_CODES: Final = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        7,  # INCORRECT_NUMBER_OF_COLUMNS
        8,  # THERE_IS_NO_COLUMN
        10,  # NOT_FOUND_COLUMN_IN_BLOCK
        15,  # DUPLICATE_COLUMN
        16,  # NO_SUCH_COLUMN_IN_TABLE
        20,  # NUMBER_OF_COLUMNS_DOESNT_MATCH
        26,  # CANNOT_PARSE_QUOTED_STRING
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        43,  # ILLEGAL_TYPE_OF_ARGUMENT
        44,  # ILLEGAL_COLUMN
        47,  # UNKNOWN_IDENTIFIER
        50,  # UNKNOWN_TYPE
        53,  # TYPE_MISMATCH
        60,  # UNKNOWN_TABLE
        62,  # SYNTAX_ERROR
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        73,  # UNKNOWN_FORMAT
        80,  # INCORRECT_QUERY
        81,  # UNKNOWN_DATABASE
        115,  # UNKNOWN_SETTING
        117,  # INCORRECT_DATA
        128,  # TOO_LARGE_ARRAY_SIZE
        131,  # TOO_LARGE_STRING_SIZE
        164,  # READONLY (the user may not write)
        169,  # BAD_TYPE_OF_FIELD
        190,  # SIZES_OF_ARRAYS_DONT_MATCH
        192,  # UNKNOWN_USER
        193,  # WRONG_PASSWORD
        194,  # REQUIRED_PASSWORD
        291,  # DATABASE_ACCESS_DENIED
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        366,  # SIZES_OF_NESTED_COLUMNS_ARE_INCONSISTENT
        376,  # CANNOT_PARSE_UUID
        452,  # SETTING_CONSTRAINT_VIOLATION
        467,  # CANNOT_PARSE_BOOL
        469,  # VIOLATED_CONSTRAINT
        471,  # INVALID_SETTING_VALUE
        472,  # READONLY_SETTING
        497,  # ACCESS_DENIED
        516,  # AUTHENTICATION_FAILED
        565,  # TOO_MANY_PARTITIONS (the same rows always span as many)
    }
)
"""Server codes for which a retry of the same rows cannot succeed."""

_UNKNOWN_OUTCOME_CODES: Final = frozenset(
    {
        159,  # TIMEOUT_EXCEEDED
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        319,  # UNKNOWN_STATUS_OF_INSERT
        394,  # QUERY_WAS_CANCELLED
        735,  # QUERY_WAS_CANCELLED_BY_CLIENT
        999,  # KEEPER_EXCEPTION
    }
)
"""Transient codes after which the rows may nevertheless have been stored."""

_CODE_IN_MESSAGE: Final = re.compile(r"\bCode: (\d+)\.")


def error_for_code(code: int, message: str) -> SinkError:
    """Return the sink error for a server error ``code`` (not raised: the caller chains it)."""
    if code in PERMANENT_CODES:
        return PermanentSinkError(message, code=code)
    return TransientSinkError(message, possibly_persisted=code in _UNKNOWN_OUTCOME_CODES)


def code_in_message(message: str) -> int | None:
    """Return the code of a ``"Code: NN. DB::Exception: ..."`` message, if it has one."""
    found = _CODE_IN_MESSAGE.search(message)
    return int(found.group(1)) if found else None
