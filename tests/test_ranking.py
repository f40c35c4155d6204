"""Spearman rank correlation and the ranking-stability curve (projects.evaluation.ranking)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml_backend.metrics import dataset_miou
from projects.evaluation.ranking import per_image_confusions, rankdata, ranking_stability, spearman


def test_rankdata_average_ties() -> None:
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rankdata([1, 1, 1]).tolist() == [2.0, 2.0, 2.0]
    assert rankdata([]).tolist() == []
    with pytest.raises(ValueError, match="NaN"):
        rankdata([1.0, float("nan")])


def _spearman_reference(a: list[float], b: list[float]) -> float:
    """Pearson correlation of average ranks written out by hand (independent of rankdata)."""

    def ranks(x: list[float]) -> list[float]:
        return [sum(1 for y in x if y < v) + (sum(1 for y in x if y == v) + 1) / 2 for v in x]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb)


def test_spearman_known_values_and_ties() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)); d = (0, -2, 1, 1) -> 1 - 36/60 = 0.4
    assert spearman([1, 2, 3, 4], [1, 4, 2, 3]) == pytest.approx(0.4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 4, 9).astype(float).tolist()
        b = rng.integers(0, 4, 9).astype(float).tolist()
        if len(set(a)) > 1 and len(set(b)) > 1:
            assert spearman(a, b) == pytest.approx(_spearman_reference(a, b))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="different lengths"):
        spearman([1, 2], [1, 2, 3])


def test_ranking_stability_matches_dataset_miou_on_prefixes() -> None:
    rng = np.random.default_rng(1)
    c, n, m = 4, 8, 3
    gts = [rng.integers(0, c, (6, 7)).astype(np.uint8) for _ in range(n)]
    for g in gts:
        g[0, :3] = 255
    # model j is right with probability 0.3 + 0.25 j: rankings settle as k grows
    preds = []
    for j in range(m):
        pj = []
        for g in gts:
            noise = rng.integers(0, c, g.shape).astype(np.uint8)
            pj.append(np.where(rng.random(g.shape) < 0.3 + 0.25 * j, np.where(g == 255, 0, g), noise))
        preds.append(pj)
    cms = np.stack([per_image_confusions(preds[j], gts, c) for j in range(m)])
    assert cms.shape == (m, n, c, c)
    curve = ranking_stability(cms, models=["a", "b", "c"])
    assert curve.ks.tolist() == list(range(1, n + 1))
    for ki, k in enumerate(curve.ks):
        for j in range(m):
            expect, _ = dataset_miou(zip(preds[j][:k], gts[:k], strict=True), c)
            assert curve.miou_at_k[ki, j] == pytest.approx(expect)
    assert curve.srcc[-1] == pytest.approx(1.0)  # all of T vs all of T
    assert curve.miou_full.tolist() == pytest.approx(curve.miou_at_k[-1].tolist())
    for ki in range(n):
        assert curve.srcc[ki] == pytest.approx(spearman(curve.miou_at_k[ki], curve.miou_full))
    sub = ranking_stability(list(cms), ks=[5, 1, 5])
    assert sub.ks.tolist() == [1, 5] and sub.models == ["m0", "m1", "m2"]
    assert sub.srcc.tolist() == pytest.approx(curve.srcc[[0, 4]].tolist())
    d = curve.to_dict()
    assert d["ks"][-1] == n and len(d["miou_at_k"]) == n


def test_ranking_stability_ties_and_bad_input() -> None:
    cm = np.zeros((2, 3, 2, 2), dtype=np.int64)
    cm[:, :, 0, 0] = 5  # both models perfect everywhere -> identical mIoU -> SRCC undefined
    curve = ranking_stability(cm)
    assert np.isnan(curve.srcc).all()
    assert curve.to_dict()["srcc"] == [None, None, None]
    with pytest.raises(ValueError, match="shape"):
        ranking_stability(np.zeros((2, 3, 2)))
    with pytest.raises(ValueError, match="ks must lie in 1..3"):
        ranking_stability(cm, ks=[4])
    with pytest.raises(ValueError, match="1 model names for 2 models"):
        ranking_stability(cm, models=["x"])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        per_image_confusions([np.zeros((2, 2))] * 2, [np.zeros((2, 2))], 2)
