"""How every benchmark script prints its figures: one JSON object, or a table."""

from __future__ import annotations

import json
from typing import Any


def print_result(result: dict[str, Any], *, as_json: bool) -> None:
    """Print ``result`` as one JSON object (``--json``) or as aligned ``key  value`` lines."""
    if as_json:
        print(json.dumps(result))
        return
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
