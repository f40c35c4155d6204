"""The one NaN-safe JSON conversion: any result tree -> something ``json.dumps`` writes as strict JSON.

Used by every writer of experiment files (round state, ratings, results, report data, model specs),
so a NaN never reaches a file as the non-standard token ``NaN``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


def jsonable(value: Any, *, default: Callable[[Any], Any] | None = None) -> Any:
    """A JSON-ready copy of ``value``.

    Mappings -> dicts with ``str`` keys; lists and tuples -> lists; dataclass instances and
    ``_asdict()`` records -> dicts; ``os.PathLike`` -> ``str``; numpy scalars -> Python numbers;
    NaN and +-inf -> ``None``. Anything else is returned unchanged, or ``default(value)`` when
    ``default`` is given and the value is not a JSON scalar (e.g. the report's
    ``"<array (H, W)>"`` for an array).
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, default=default) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, default=default) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return jsonable(value.item())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value), default=default)
    if hasattr(value, "_asdict"):
        return jsonable(value._asdict(), default=default)
    return default(value) if default is not None else value

