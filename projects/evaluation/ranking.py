"""Ranking stability of models on a test set (the paper's Appendix C) — pure numpy.

* :func:`spearman` — Spearman rank correlation (SRCC) with ties given their average rank
  (= Pearson correlation of the average ranks).
* :func:`ranking_stability` — for k = 1..N: rank the models by dataset-level mIoU on the first k
  images of the test set and compare with the ranking on all N images (SRCC). The mIoU is
  ``ml_backend.metrics.miou_from_confusion`` of the per-image confusion matrices summed over the
  first k images, i.e. exactly the dataset-level mIoU used everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_backend.classes import IGNORE_INDEX
from ml_backend.metrics import confusion_matrix, miou_from_confusion


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of the values of a 1-D array (n,), ties sharing their average rank; float64 (n,)."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if np.isnan(a).any():
        raise ValueError("cannot rank NaN values")
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], a.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    run_of = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = avg[run_of]
    return ranks


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation of two equally long 1-D score arrays, in [-1, 1].

    Ties get average ranks. Returns NaN when it is undefined: fewer than 2 values, or all the
    values of either array are equal.
    """
    ra, rb = rankdata(a), rankdata(b)
    if ra.size != rb.size:
        raise ValueError(f"spearman: arrays have different lengths {ra.size} and {rb.size}")
    if ra.size < 2:
        return float("nan")
    da, db = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((da * da).sum() * (db * db).sum())
    if den == 0:
        return float("nan")
    return float(np.clip((da * db).sum() / den, -1.0, 1.0))


def per_image_confusions(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Stack of per-image confusion matrices (N, C, C) int64 for label maps ``preds[i]``, ``gts[i]``
    (each (H_i, W_i); rows = ground truth), via ``ml_backend.metrics.confusion_matrix``."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth maps")
    out = np.zeros((len(preds), num_classes, num_classes), dtype=np.int64)
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        out[i] = confusion_matrix(p, g, num_classes, ignore_index)
    return out


@dataclass(frozen=True)
class RankingCurve:
    """Result of :func:`ranking_stability`.

    ``models``: names (M,); ``ks``: prefix sizes (K,); ``srcc``: (K,) SRCC between the ranking on
    the first k images and on all of them (NaN where undefined, e.g. all models tie);
    ``miou_at_k``: (K, M) dataset-level mIoU on the first k images; ``miou_full``: (M,) on all.
    """

    models: list[str]
    ks: np.ndarray
    srcc: np.ndarray
    miou_at_k: np.ndarray
    miou_full: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        return {
            "models": list(self.models), "ks": [int(k) for k in self.ks],
            "srcc": [clean(v) for v in self.srcc],
            "miou_at_k": [[clean(v) for v in row] for row in self.miou_at_k],
            "miou_full": [clean(v) for v in self.miou_full],
        }


def ranking_stability(
    confusions: np.ndarray | Sequence[np.ndarray],
    models: Sequence[str] | None = None,
    ks: Sequence[int] | None = None,
) -> RankingCurve:
    """SRCC of the models' mIoU ranking on the first k test images vs on all of them.

    ``confusions``: (M, N, C, C) per-model, per-image confusion matrices, images in test-set
    order (or a sequence of M arrays (N, C, C), e.g. from :func:`per_image_confusions`).
    ``ks``: prefix sizes in 1..N (default: all of 1..N). ``models``: M names (default m0, m1, ...).
    """
    cms = np.asarray(confusions if isinstance(confusions, np.ndarray) else np.stack(list(confusions)))
    if cms.ndim != 4 or cms.shape[2] != cms.shape[3]:
        raise ValueError(f"confusions must have shape (M, N, C, C), got {cms.shape}")
    m, n = cms.shape[:2]
    if n == 0:
        raise ValueError("ranking_stability needs at least one test image")
    names = list(models) if models is not None else [f"m{j}" for j in range(m)]
    if len(names) != m:
        raise ValueError(f"{len(names)} model names for {m} models")
    ks_arr = np.arange(1, n + 1) if ks is None else np.asarray(sorted(set(int(k) for k in ks)))
    if ks_arr.size == 0 or ks_arr[0] < 1 or ks_arr[-1] > n:
        raise ValueError(f"ks must lie in 1..{n}, got {list(ks_arr)}")
    cum = np.cumsum(cms.astype(np.int64), axis=1)  # (M, N, C, C)
    miou_full = np.array([miou_from_confusion(cum[j, n - 1]) for j in range(m)])
    miou_at_k = np.array([[miou_from_confusion(cum[j, k - 1]) for j in range(m)] for k in ks_arr])
    srcc = np.array([spearman(row, miou_full) for row in miou_at_k])
    return RankingCurve(models=names, ks=ks_arr, srcc=srcc, miou_at_k=miou_at_k, miou_full=miou_full)
