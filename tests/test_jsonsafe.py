"""The one NaN-safe JSON conversion (ml_backend.jsonsafe.jsonable)."""

from __future__ import annotations

import json
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml_backend.jsonsafe import jsonable


@dataclass
class _Rec:
    a: float
    p: Path


def test_non_finite_numbers_become_null_and_the_result_is_strict_json() -> None:
    raw = {"nan": float("nan"), "inf": float("inf"), "-inf": -np.inf, "np": np.float32("nan"),
           "ok": 0.5, "i": np.int64(3), "b": np.bool_(True), 7: (1, 2.0), "s": "x", "n": None}
    out = jsonable(raw)
    assert out == {"nan": None, "inf": None, "-inf": None, "np": None, "ok": 0.5, "i": 3, "b": True,
                   "7": [1, 2.0], "s": "x", "n": None}
    assert type(out["i"]) is int and type(out["b"]) is bool
    json.dumps(out, allow_nan=False)  # strict JSON: would raise on a NaN left behind


def test_records_and_paths() -> None:
    Pt = namedtuple("Pt", "x y")
    out = jsonable({"rec": _Rec(float("nan"), Path("/a/b")), "path": Path("c"), "pt": [Pt(1, 2)]})
    assert out == {"rec": {"a": None, "p": "/a/b"}, "path": "c", "pt": [[1, 2]]}


def test_default_only_for_values_json_cannot_hold() -> None:
    arr = np.zeros((2, 3))
    out = jsonable({"a": arr, "f": float("nan"), "s": "keep"}, default=lambda v: f"<{type(v).__name__}>")
    assert out == {"a": "<ndarray>", "f": None, "s": "keep"}
    # without a default an unknown object is passed through unchanged (positive control)
    assert jsonable({"a": arr})["a"] is arr
