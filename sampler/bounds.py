"""Per-class size bounds ``[p_k, q_k]`` for MAD selection, from reference masks (pure logic).

``bounds_from_masks(masks, num_classes, method="quartiles", min_count=5)`` streams over label
masks (each (H, W) uint8 of class indices, ``ignore_index`` allowed) and, per class ``k``,
collects the class's area fraction ``|mask == k| / (H * W)`` in every mask where it occurs
(the fraction of all pixels, so that it matches the area fractions a model predicts over the
whole image). Then:

- ``"quartiles"`` (the paper): ``[Q1, Q3]`` (first and third quartile, linear interpolation);
- ``"mean_std"`` (the authors' public code): ``[mean - std, mean + std]`` clipped to the
  class's ``[min, max]``.

A class seen in fewer than ``min_count`` masks cannot support a reliable estimate, so it falls
back to the default, and each fallback is logged (logger ``sampler.bounds``):

- ``fallback="pooled"`` (default): the same statistic over the area fractions of *all*
  foreground classes pooled together (a generic object-size prior); if even the pooled sample
  has fewer than ``min_count`` values, ``(0.0, 1.0)`` (no size constraint beyond ``a > 0``);
- ``fallback="none"``: ``(0.0, 1.0)``;
- ``fallback=(p, q)``: that pair.

Row 0 (background) is computed the same way but is never used by the selection.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal, Union

import numpy as np

from ml_backend.classes import IGNORE_INDEX

log = logging.getLogger(__name__)

BoundsMethod = Literal["quartiles", "mean_std"]
BOUNDS_METHODS: tuple[str, ...] = ("quartiles", "mean_std")
NO_BOUNDS: tuple[float, float] = (0.0, 1.0)
Fallback = Union[Literal["pooled", "none"], tuple[float, float]]


def class_area_fractions(mask: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Area fraction per class of one mask (H, W) -> (C,) float64 (fraction of all H*W pixels)."""
    flat = np.asarray(mask).reshape(-1).astype(np.int64)
    valid = (flat >= 0) & (flat < num_classes) & (flat != ignore_index)
    counts = np.bincount(flat[valid], minlength=num_classes)[:num_classes]
    return counts / max(flat.size, 1)


def _statistic(values: np.ndarray, method: str) -> tuple[float, float]:
    if method == "quartiles":
        q1, q3 = np.percentile(values, [25.0, 75.0])
        return float(q1), float(q3)
    mean, std = float(values.mean()), float(values.std())
    lo, hi = float(values.min()), float(values.max())
    return float(np.clip(mean - std, lo, hi)), float(np.clip(mean + std, lo, hi))


def bounds_from_fractions(
    fractions: np.ndarray,
    method: BoundsMethod = "quartiles",
    min_count: int = 5,
    fallback: Fallback = "pooled",
    class_names: Iterable[str] | None = None,
) -> np.ndarray:
    """Bounds (C, 2) from per-mask area fractions (M, C) (0 = class absent in that mask)."""
    if method not in BOUNDS_METHODS:
        raise ValueError(f"unknown bounds method {method!r}; choose one of {', '.join(BOUNDS_METHODS)}")
    fractions = np.asarray(fractions, dtype=np.float64)
    num_classes = fractions.shape[1]
    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    pooled = fractions[:, 1:][fractions[:, 1:] > 0]
    if fallback == "pooled":
        default = _statistic(pooled, method) if pooled.size >= max(min_count, 1) else NO_BOUNDS
        why = f"pooled foreground sizes ({pooled.size} occurrences)" if pooled.size >= max(min_count, 1) \
            else "no size constraint"
    elif fallback == "none":
        default, why = NO_BOUNDS, "no size constraint"
    else:
        default, why = (float(fallback[0]), float(fallback[1])), "given default"
    out = np.empty((num_classes, 2), dtype=np.float64)
    for k in range(num_classes):
        vals = fractions[:, k][fractions[:, k] > 0]
        if vals.size >= max(min_count, 1):
            out[k] = _statistic(vals, method)
        else:
            out[k] = default
            if k > 0:
                log.warning(
                    "class %s occurs in %d reference mask(s) (< %d): using fallback bounds [%.4f, %.4f] (%s)",
                    names[k], vals.size, min_count, default[0], default[1], why,
                )
    return out


def bounds_from_masks(
    masks: Iterable[np.ndarray],
    num_classes: int,
    method: BoundsMethod = "quartiles",
    *,
    min_count: int = 5,
    fallback: Fallback = "pooled",
    ignore_index: int = IGNORE_INDEX,
    class_names: Iterable[str] | None = None,
) -> np.ndarray:
    """Per-class area bounds (C, 2) ``[p_k, q_k]`` from label masks (each (H, W)).

    The masks are consumed once, one at a time (only C floats per mask are kept). See the module
    docstring for ``method``, ``min_count`` and ``fallback``.
    """
    rows = [class_area_fractions(mk, num_classes, ignore_index) for mk in masks]
    fractions = np.stack(rows) if rows else np.zeros((0, num_classes))
    return bounds_from_fractions(fractions, method, min_count, fallback, class_names)
