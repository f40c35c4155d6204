"""Type checks of model options, so a wrongly typed value in a TOML file is one clear error.

:func:`option_problem` is pure: it says what is wrong with one ``key = value`` of a model spec, or
returns None. Keys it does not know are left to the entry that reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ModelError


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _size_ok(v: Any) -> bool:
    if _is_int(v):
        return v > 0
    if isinstance(v, str):
        parts = v.lower().replace(",", "x").split("x")
        return 1 <= len(parts) <= 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts)
    return isinstance(v, (list, tuple)) and len(v) in (1, 2) and all(_is_int(x) and x > 0 for x in v)


_CHECKS: dict[str, tuple[Any, str]] = {
    "scale": (_is_num, "a number (e.g. 2.0)"),
    "input_size": (_size_ok, "a size: 384, \"384x512\" or [384, 512]"),
    "num_classes": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "class_names": (lambda v: isinstance(v, (list, tuple)) and len(v) >= 2
                    and all(isinstance(x, str) and x for x in v), "a list of class names"),
    "weights": (lambda v: v is None or isinstance(v, str), "a string (e.g. \"pretrained\", \"random\")"),
    "seed": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "mean": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_num(x) for x in v),
             "a list of 3 numbers (0..1 units)"),
    "std": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_num(x) and x > 0 for x in v),
            "a list of 3 positive numbers (0..1 units)"),
    "num_threads": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "bf16": (lambda v: isinstance(v, bool), "true or false"),
    "channels_last": (lambda v: isinstance(v, bool), "true or false"),
    "class_map": (lambda v: isinstance(v, str) and bool(v.strip()), "a shipped map name or a map file path"),
    "layout": (lambda v: isinstance(v, str) and v.upper() in ("NCHW", "NHWC"), "\"NCHW\" or \"NHWC\""),
    "output_layout": (lambda v: isinstance(v, str) and v.upper() in ("NCHW", "NHWC"), "\"NCHW\" or \"NHWC\""),
    "input_name": (lambda v: isinstance(v, str) and bool(v), "a tensor name"),
    "output_name": (lambda v: isinstance(v, str) and bool(v), "a tensor name"),
    "output": (lambda v: v in ("logits", "probabilities", "labels"),
               "\"logits\", \"probabilities\" or \"labels\""),
    "provider": (lambda v: isinstance(v, str) and v.lower() in ("auto", "cpu", "cuda"),
                 "\"auto\", \"cpu\" or \"cuda\""),
    "pretrained": (lambda v: isinstance(v, str) and bool(v.strip()), "a model folder path"),
}


def option_problem(key: str, value: Any) -> str | None:
    """What is wrong with option ``key = value`` (e.g. ``"must be an integer >= 2, got 'x'"``), or None."""
    check = _CHECKS.get(key)
    if check is None or check[0](value):
        return None
    return f"must be {check[1]}, got {value!r}"


def check_options(options: Any, where: str, prefix: str = "option ") -> dict[str, Any]:
    """``options`` as a dict after type checks, else :class:`ModelError`
    ``"<where>: <prefix><key> must be ..."``."""
    if not isinstance(options, Mapping):
        raise ModelError(f"{where}: options must be a table (e.g. {{ scale = 2.0 }}), got {options!r}")
    for key, value in options.items():
        problem = option_problem(str(key), value)
        if problem:
            raise ModelError(f"{where}: {prefix}{key} {problem}")
    return dict(options)
