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


# =============================================================================================
# the per-class rule: S(0) where it has enough masks, else the models' predictions on the pool
# =============================================================================================

#: ``[selection] bounds`` rules: ``"auto"`` (default: S(0) per class where it has ``min_count``
#: masks of the class, else the pool's predictions, else none), ``"s0"`` (the paper: S(0) only,
#: classes with too few masks use the pooled S(0) fallback), ``"pool"`` (predictions only),
#: ``"none"`` (no size constraint).
BOUNDS_RULES: tuple[str, ...] = ("auto", "s0", "pool", "none")


def pool_area_samples(target_areas: np.ndarray, competitor_areas: np.ndarray) -> list[np.ndarray]:
    """Per class k: the predicted area fractions of class k over the images where the target or a
    competitor predicts it, one value per (model, image) with area > 0.

    Args:
        target_areas: (N, C) the target's predicted area fractions.
        competitor_areas: (m, N, C) the competitors'.
    Returns:
        C arrays (float64), entry k of shape (n_k,).
    """
    ta = np.asarray(target_areas, dtype=np.float64)
    ca = np.asarray(competitor_areas, dtype=np.float64).reshape(-1, ta.shape[0], ta.shape[1])
    allm = np.concatenate([ta[None], ca], axis=0)  # (m+1, N, C)
    return [allm[:, :, k][allm[:, :, k] > 0] for k in range(ta.shape[1])]


def class_bounds(
    s0_fractions: np.ndarray | None,
    target_areas: np.ndarray,
    competitor_areas: np.ndarray,
    rule: str = "auto",
    method: BoundsMethod = "quartiles",
    min_count: int = 5,
    class_names: Iterable[str] | None = None,
) -> tuple[np.ndarray, dict]:
    """Per-class size bounds (C, 2) and a report of where each came from (pure logic).

    Args:
        s0_fractions: (M, C) area fractions of the S(0) masks (:func:`class_area_fractions` per
            mask; 0 = class absent), or None when there is no S(0).
        target_areas: (N, C) the target's predicted area fractions on the pool.
        competitor_areas: (m, N, C) the competitors'.
        rule: one of :data:`BOUNDS_RULES`.
        method: the statistic (``"quartiles"``: [Q1, Q3]; ``"mean_std"``).
        min_count: the fewest values a class needs for a statistic from that source.
    Returns:
        ``(bounds, report)``; ``report`` is JSON-able: ``{"rule", "method", "min_count",
        "counts": {"s0": n, "pool": n, "none": n, "s0_pooled": n}, "classes": {name: {"source",
        "s0_masks", "pool_predictions", "bounds": [p, q]}}}`` (classes 1..C-1). Each class's source
        and counts are also logged (logger ``sampler.bounds``).

    ``"auto"``: S(0) where it has ``>= min_count`` masks of the class; otherwise the statistic of
    the class's predicted areas over the images where the target or a competitor predicts it
    (:func:`pool_area_samples`), when there are ``>= min_count`` such predictions; otherwise no
    bound (``[0, 1]``). ``"s0"`` is :func:`bounds_from_fractions` with the pooled fallback (the
    paper's rule as madseg always ran it); ``"pool"`` skips S(0); ``"none"`` bounds nothing.
    """
    if rule not in BOUNDS_RULES:
        raise ValueError(f"unknown bounds rule {rule!r}; choose one of {', '.join(BOUNDS_RULES)}")
    if method not in BOUNDS_METHODS:
        raise ValueError(f"unknown bounds method {method!r}; choose one of {', '.join(BOUNDS_METHODS)}")
    ta = np.asarray(target_areas, dtype=np.float64)
    c = ta.shape[1]
    names = list(class_names) if class_names is not None else [str(k) for k in range(c)]
    s0 = np.zeros((0, c)) if s0_fractions is None else np.asarray(s0_fractions, dtype=np.float64)
    if s0.ndim != 2 or s0.shape[1] != c:
        raise ValueError(f"s0_fractions must be (M, {c}), got shape {s0.shape}")
    s0_counts = (s0 > 0).sum(0)
    pool = pool_area_samples(ta, competitor_areas)
    need = max(min_count, 1)
    out = np.tile(np.array(NO_BOUNDS), (c, 1))
    sources = ["none"] * c
    if rule == "s0":
        out = bounds_from_fractions(s0, method, min_count, "pooled", names)
        pooled = (s0[:, 1:] > 0).sum() >= need
        sources = ["s0" if s0_counts[k] >= need else ("s0_pooled" if pooled else "none") for k in range(c)]
    elif rule in ("auto", "pool"):
        for k in range(1, c):
            if rule == "auto" and s0_counts[k] >= need:
                vals, sources[k] = s0[:, k][s0[:, k] > 0], "s0"
            elif pool[k].size >= need:
                vals, sources[k] = pool[k], "pool"
            else:
                continue
            out[k] = _statistic(vals, method)
    classes = {}
    for k in range(1, c):
        classes[names[k]] = {"source": sources[k], "s0_masks": int(s0_counts[k]),
                             "pool_predictions": int(pool[k].size),
                             "bounds": [round(float(out[k, 0]), 6), round(float(out[k, 1]), 6)]}
        log.info("size bounds of %s: [%.4f, %.4f] from %s (%d S(0) masks, %d pool predictions)",
                 names[k], out[k, 0], out[k, 1], sources[k], s0_counts[k], pool[k].size)
    counts = {s: sum(1 for k in range(1, c) if sources[k] == s) for s in ("s0", "s0_pooled", "pool", "none")}
    log.info("size bounds (rule %s, %s, min_count %d): %s", rule, method, min_count,
             ", ".join(f"{n} from {s}" for s, n in counts.items() if n))
    report = {"rule": rule, "method": method, "min_count": int(min_count), "counts": counts,
              "classes": classes}
    return out, report
