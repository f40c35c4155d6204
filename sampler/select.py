"""MAD candidate selection (pure logic: numpy only).

``mad_select(target_areas, competitor_areas, distances, bounds, n3)`` solves, for every
competitor ``j`` (of ``m``), every class ``k >= 1`` (of ``C``; class 0, background, is never
used) and both partitions ``P`` in :data:`PARTITIONS` = ``("target", "competitor")``, one
selection problem:

- eligible images: those where ``P``'s model (the target for ``"target"``, competitor ``j`` for
  ``"competitor"``) predicts class ``k`` with area fraction ``a > 0`` and ``p_k <= a <= q_k``
  (``bounds[k] = [p_k, q_k]``);
- pick the ``n3`` eligible images with the largest ``distances[j]`` (ties: smaller image index
  first); fewer when fewer are eligible.

It returns every selection as a :class:`MadRecord` ``(image, competitor, cls, partition,
distance, rank)`` — ``rank`` is 1 for the largest distance of its problem — sorted by
(competitor, class, partition in the order of :data:`PARTITIONS`, rank). The set of selected
images ``M`` is :func:`selected_images`; :func:`records_by_image` groups the records per image,
each image's list ordered by the best (smallest) rank it reached.

Speed: per competitor, a partial sort yields the images with the top ``max(64 n3, 4096)``
distances in exact (distance desc, index asc) order, including every image tied with the last
one, so it is an exact prefix of the full order. Each problem checks eligibility on that prefix
only; a problem that finds fewer than ``n3`` eligible images there (a rare class, so few are
eligible) ranks all its eligible images instead. N = 1e6, m = 5, C = 21 takes well under a second
on 2 CPU cores (``benchmarks/selection.py``), about a second when every class is rare.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

PARTITIONS: tuple[str, str] = ("target", "competitor")


class MadRecord(NamedTuple):
    """One selection: image ``image`` was picked for (``competitor``, ``cls``, ``partition``) at
    1-based ``rank`` with distance ``distance``."""

    image: int
    competitor: int
    cls: int
    partition: str
    distance: float
    rank: int


def _eligibility(areas: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Eligibility (C-1, N) bool of classes 1..C-1 from areas (N, C) and bounds (C, 2)."""
    a = areas[:, 1:]
    p = bounds[1:, 0]
    q = bounds[1:, 1]
    ok = (a > 0) & (a >= p) & (a <= q)
    return np.ascontiguousarray(ok.T)


#: The first pass looks at the top max(_PREFIX_FACTOR * n3, _PREFIX_MIN) distances only.
_PREFIX_FACTOR = 64
_PREFIX_MIN = 4096


def _top_prefix(d: np.ndarray, size: int) -> np.ndarray:
    """Image indices sorted by (-d, index) that include *every* image whose distance is at least
    the ``size``-th largest (so the result is an exact prefix of the full order)."""
    n = d.shape[0]
    if size >= n:
        return np.argsort(-d, kind="stable")
    thr = np.partition(d, n - size)[n - size]
    sel = np.flatnonzero(d >= thr)  # ascending index
    return sel[np.argsort(-d[sel], kind="stable")]


def _validate(
    target_areas: np.ndarray, competitor_areas: np.ndarray, distances: np.ndarray, bounds: np.ndarray,
    n3: int,
) -> None:
    if target_areas.ndim != 2:
        raise ValueError(f"target_areas must be (N, C), got shape {target_areas.shape}")
    n, c = target_areas.shape
    if competitor_areas.ndim != 3 or competitor_areas.shape[1:] != (n, c):
        raise ValueError(f"competitor_areas must be (m, {n}, {c}), got shape {competitor_areas.shape}")
    m = competitor_areas.shape[0]
    if distances.shape != (m, n):
        raise ValueError(f"distances must be ({m}, {n}), got shape {distances.shape}")
    if bounds.shape != (c, 2):
        raise ValueError(f"bounds must be ({c}, 2), got shape {bounds.shape}")
    if n3 < 0:
        raise ValueError(f"n3 must be >= 0, got {n3}")
    if np.isnan(distances).any():
        raise ValueError("distances contain NaN")


def mad_select(
    target_areas: np.ndarray,
    competitor_areas: np.ndarray,
    distances: np.ndarray,
    bounds: np.ndarray,
    n3: int,
) -> list[MadRecord]:
    """Select the top-``n3`` images of every (competitor, class >= 1, partition) problem.

    Args:
        target_areas: (N, C) area fraction of each class predicted by the target.
        competitor_areas: (m, N, C) the same for each competitor.
        distances: (m, N) distance between the target's and competitor j's label maps.
        bounds: (C, 2) ``[p_k, q_k]`` area bounds per class (row 0 is not used).
        n3: images per problem.

    Returns:
        Records sorted by (competitor, class, partition, rank); see the module docstring.
    """
    target_areas = np.asarray(target_areas)
    competitor_areas = np.asarray(competitor_areas)
    distances = np.asarray(distances, dtype=np.float64)
    bounds = np.asarray(bounds, dtype=np.float64)
    _validate(target_areas, competitor_areas, distances, bounds, n3)
    m = competitor_areas.shape[0]
    c = target_areas.shape[1]
    records: list[MadRecord] = []
    if n3 == 0 or target_areas.shape[0] == 0 or c < 2:
        return records
    bounds_t = bounds.T  # (2, C)
    full_elig: dict[int, np.ndarray] = {}  # model (-1 = target, j = competitor) -> (C-1, N) bool

    def eligible_rows(model: int) -> np.ndarray:
        if model not in full_elig:
            full_elig[model] = _eligibility(target_areas if model < 0 else competitor_areas[model], bounds)
        return full_elig[model]

    n = target_areas.shape[0]
    for j in range(m):
        d = distances[j]
        prefix = _top_prefix(d, max(_PREFIX_FACTOR * n3, _PREFIX_MIN))
        for k in range(1, c):
            p_k, q_k = bounds_t[0, k], bounds_t[1, k]
            for part, model in zip(PARTITIONS, (-1, j), strict=True):
                areas = target_areas if model < 0 else competitor_areas[j]
                a = areas[prefix, k]
                hit = prefix[(a > 0) & (a >= p_k) & (a <= q_k)]
                if hit.size >= n3 or prefix.size == n:
                    chosen = hit[:n3]
                else:  # a rare class: rank its (few) eligible images directly
                    cand = np.flatnonzero(eligible_rows(model)[k - 1])
                    chosen = cand[_top_prefix(d[cand], n3)[:n3]]
                dist = d[chosen]
                records.extend(
                    MadRecord(int(i), j, k, part, float(v), r + 1)
                    for r, (i, v) in enumerate(zip(chosen.tolist(), dist.tolist(), strict=True))
                )
    return records


def selected_images(records: Iterable[MadRecord]) -> np.ndarray:
    """The set M of selected images: sorted unique image indices (int64)."""
    return np.unique(np.fromiter((r.image for r in records), dtype=np.int64))


def records_by_image(records: Iterable[MadRecord]) -> dict[int, list[MadRecord]]:
    """Records grouped per image; each list sorted by (rank, competitor, class, partition order).

    The dict is ordered by each image's best rank, then image index.
    """
    groups: dict[int, list[MadRecord]] = defaultdict(list)
    for r in records:
        groups[r.image].append(r)
    pidx = {p: i for i, p in enumerate(PARTITIONS)}
    for lst in groups.values():
        lst.sort(key=lambda r: (r.rank, r.competitor, r.cls, pidx[r.partition]))
    return dict(sorted(groups.items(), key=lambda kv: (kv[1][0].rank, kv[0])))


def n3_for_size(
    target_areas: np.ndarray,
    competitor_areas: np.ndarray,
    distances: np.ndarray,
    bounds: np.ndarray,
    n3: int,
    size: int,
) -> int:
    """The smallest ``n3' >= n3`` whose M (:func:`mad_select` with ``n3'``) has at least ``size``
    images, or the smallest ``n3'`` that reaches the largest M the bounds allow when no ``n3'``
    gets there. (|M| never shrinks as ``n3`` grows: each problem's picks are a prefix of one
    order.) Arrays as in :func:`mad_select`; used to fill a rating budget larger than M."""
    n = np.asarray(target_areas).shape[0]

    def m_size(k: int) -> int:
        return int(selected_images(mad_select(target_areas, competitor_areas, distances, bounds, k)).size)

    if n3 < 1 or size <= m_size(n3):
        return n3
    top = m_size(max(n, n3))  # every eligible image of every problem
    want = min(size, top)
    lo, hi = n3, n3
    while m_size(hi) < want:  # doubling, then bisection
        lo, hi = hi, min(2 * hi, max(n, n3))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if m_size(mid) >= want:
            hi = mid
        else:
            lo = mid
    return hi
