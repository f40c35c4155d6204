"""The order in which M goes to the raters (pure logic: numpy only).

Raters' time is the scarce resource: when a rating budget R stops the rating after M's first R
candidates, those R should be the candidates most likely to be *real* failures of the target,
spread over many classes. :func:`rating_order` orders the images of M (from the MAD records):

1. **Evidence that the target fails: agreement of the competitors against it.** For each
   competitor j, the distance ``d_j(i)`` between the target's and competitor j's label maps is
   turned into its percentile among all images of the pool (0 = the most similar image, 1 = the
   most different), which makes competitors of different styles comparable without any
   constant. The evidence of image i is the mean percentile over the competitors (a Borda count).
   An image where the target disagrees with *every* competitor scores high; on one where a single
   competitor is odd (that competitor is probably the one that fails), the others' low
   percentiles pull the mean down.
2. **Likely failures first: two tiers.** Candidates whose evidence is at least the median
   evidence of the pool (the target disagrees with the competitors more than on a typical image)
   come before the others. The median is a statistic of the pool, not a fitted constant.
3. **Diversity: class round-robin within each tier.** Each image of M belongs to the classes of
   the MAD problems that chose it. Classes take turns: in every round, each class (classes in the
   order of the evidence of their best remaining image) gives its remaining image with the most
   evidence; an image already placed is skipped. So the strongest likely failure of every class
   is shown before the second-strongest of any class, and no class gets a weak candidate in
   before every class's likely failures are out.

The design was chosen on the development half of ``coco_voc`` (``benchmarks/efficacy.py --half
0``) against the paper's order, evidence alone, and round-robin without tiers; the README gives
the measured figures. Ties (equal evidence) go to the smaller image index. ``order="rank"``
gives the order madseg used before (the paper's: by the best rank an image reached in any
problem, then the largest distance).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .select import MadRecord, records_by_image

ORDERS: tuple[str, ...] = ("failures", "rank")


def pool_percentiles(distances: np.ndarray) -> np.ndarray:
    """Per competitor, each image's distance as its percentile in the pool: (m, N) -> (m, N) in
    [0, 1] (ties share their mean rank; one image -> 0.5)."""
    d = np.asarray(distances, dtype=np.float64)
    m, n = d.shape
    out = np.empty_like(d)
    if n == 0:
        return out
    for j in range(m):
        order = np.argsort(d[j], kind="stable")
        ranks = np.empty(n)
        ranks[order] = np.arange(n, dtype=np.float64)
        # ties: mean rank of the tied run
        vals = d[j][order]
        starts = np.flatnonzero(np.r_[True, vals[1:] != vals[:-1]])
        ends = np.r_[starts[1:], n]
        mean_rank = (starts + ends - 1) / 2.0
        run = np.repeat(np.arange(starts.size), ends - starts)
        ranks[order] = mean_rank[run]
        out[j] = ranks / (n - 1) if n > 1 else 0.5
    return out


def failure_evidence(distances: np.ndarray) -> np.ndarray:
    """Evidence that the target fails on each image: mean over competitors of the pool percentile
    of the distance, (m, N) -> (N,) in [0, 1] (0 when there is no competitor)."""
    d = np.asarray(distances, dtype=np.float64)
    if d.shape[0] == 0:
        return np.zeros(d.shape[1])
    return pool_percentiles(d).mean(0)


def class_round_robin(
    images: np.ndarray, evidence: np.ndarray, classes: Sequence[Sequence[int]]
) -> np.ndarray:
    """Order ``images`` (K,) by class round-robin (see the module docstring).

    Args:
        images: (K,) image indices.
        evidence: (K,) evidence of each image (larger first).
        classes: per image, the classes it belongs to (an image with none forms its own class -1).
    Returns:
        (K,) the images in rating order.
    """
    images = np.asarray(images, dtype=np.int64)
    ev = np.asarray(evidence, dtype=np.float64)
    k = images.size
    by_ev = np.lexsort((images, -ev))  # positions, best first
    queues: dict[int, list[int]] = {}
    for pos in by_ev.tolist():
        for c in (classes[pos] or [-1]):
            queues.setdefault(int(c), []).append(pos)
    heads = {c: 0 for c in queues}
    placed = np.zeros(k, dtype=bool)
    out: list[int] = []
    rank_of = np.empty(k, dtype=np.int64)
    rank_of[by_ev] = np.arange(k)
    while len(out) < k:
        # the classes, each with its best remaining image, in the order of those images
        fronts = []
        for c, q in queues.items():
            h = heads[c]
            while h < len(q) and placed[q[h]]:
                h += 1
            heads[c] = h
            if h < len(q):
                fronts.append((rank_of[q[h]], c))
        fronts.sort()
        for _, c in fronts:
            q, h = queues[c], heads[c]
            while h < len(q) and placed[q[h]]:
                h += 1
            heads[c] = h
            if h < len(q):
                placed[q[h]] = True
                out.append(q[h])
                heads[c] = h + 1
    return images[np.array(out, dtype=np.int64)]


def rank_order(records: Sequence[MadRecord]) -> np.ndarray:
    """The paper's order: by the best rank an image reached, then its largest distance, then index."""
    g = records_by_image(records)
    order = sorted(g, key=lambda i: (g[i][0].rank, -max(r.distance for r in g[i]), i))
    return np.array(order, dtype=np.int64)


def rating_order(
    records: Sequence[MadRecord],
    target_areas: np.ndarray | None = None,
    competitor_areas: np.ndarray | None = None,
    distances: np.ndarray | None = None,
    order: str = "failures",
) -> np.ndarray:
    """The images of M (from ``records``) in the order raters should see them.

    Args:
        records: MAD records (``sampler.select.mad_select``) over a pool of N images.
        target_areas, competitor_areas: (N, C), (m, N, C); not used by the orders here (kept so
            every order sees the same inputs).
        distances: (m, N) the distances the records were selected on (required for "failures").
        order: ``"failures"`` (evidence tiers + class round-robin) or ``"rank"``.
    Returns:
        (|M|,) int64 image indices.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    if order == "rank":
        return rank_order(records)
    if distances is None:
        raise ValueError("the 'failures' order needs the distances (m, N)")
    g = records_by_image(records)
    images = np.array(sorted(g), dtype=np.int64)
    if images.size == 0:
        return images
    pool_ev = failure_evidence(distances)
    ev = pool_ev[images]
    upper = ev >= np.median(pool_ev)
    out = []
    for tier in (upper, ~upper):
        if tier.any():
            classes = [sorted({r.cls for r in g[int(i)]}) for i in images[tier]]
            out.append(class_round_robin(images[tier], ev[tier], classes))
    return np.concatenate(out)
