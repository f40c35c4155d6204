"""Unit tests of sampler.order: the order in which M goes to the raters (pure logic)."""

from __future__ import annotations

import numpy as np
import pytest

from sampler.order import class_round_robin, failure_evidence, pool_percentiles, rank_order, rating_order
from sampler.select import MadRecord, mad_select
from tests.test_sampler_select import random_problem


def test_pool_percentiles_scale_free_with_ties():
    d = np.array([[0.1, 0.5, 0.3, 0.3], [10.0, 50.0, 30.0, 40.0]])
    p = pool_percentiles(d)
    assert p[0].tolist() == pytest.approx([0.0, 1.0, 0.5, 0.5])  # the tied pair shares ranks 1 and 2
    assert p[1].tolist() == pytest.approx([0.0, 1.0, 1 / 3, 2 / 3])
    assert pool_percentiles(np.array([[0.7]])).tolist() == [[0.5]]
    # a monotone change of one competitor's scale changes nothing
    np.testing.assert_allclose(pool_percentiles(d ** 3 * 7), p)


def test_evidence_prefers_disagreement_with_every_competitor():
    # image 0: the target disagrees with all three competitors (moderately);
    # image 1: one competitor is very different (the odd one out), the others agree with the target
    d = np.array([[0.6, 0.1, 0.2, 0.3],
                  [0.6, 0.1, 0.2, 0.3],
                  [0.6, 0.99, 0.2, 0.3]])
    ev = failure_evidence(d)
    assert ev.argmax() == 0 and ev[0] > ev[1]
    assert failure_evidence(np.zeros((0, 3))).tolist() == [0.0, 0.0, 0.0]


def test_class_round_robin_shows_every_class_before_a_second_image_of_any():
    images = np.array([10, 11, 12, 13, 14, 15])
    ev = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    classes = [[1], [1], [1], [2], [3], [2]]
    out = class_round_robin(images, ev, classes).tolist()
    assert out == [10, 13, 14, 11, 15, 12]
    # an image in two classes is placed once, for the first class that reaches it
    out = class_round_robin(np.array([0, 1, 2]), np.array([0.9, 0.5, 0.4]), [[1, 2], [2], [1]])
    assert out.tolist() == [0, 1, 2]
    assert class_round_robin(np.array([5, 6]), np.array([0.2, 0.3]), [[], []]).tolist() == [6, 5]


def _recs():
    return [MadRecord(3, 0, 1, "target", 0.9, 1), MadRecord(5, 0, 1, "target", 0.8, 2),
            MadRecord(7, 1, 2, "competitor", 0.95, 1), MadRecord(5, 1, 2, "competitor", 0.2, 2)]


def test_rank_order_is_the_earlier_order():
    # best rank first (3 and 7 reached rank 1), then the larger distance, then the index
    assert rank_order(_recs()).tolist() == [7, 3, 5]


def test_rating_order_failures_uses_evidence_then_round_robin():
    d = np.zeros((2, 8))
    d[:, 5] = 1.0  # both competitors disagree most on image 5
    d[0, 3], d[1, 7] = 0.5, 0.5
    out = rating_order(_recs(), distances=d).tolist()
    assert sorted(out) == [3, 5, 7]  # a permutation of M
    assert out[0] == 5  # the strongest evidence first (image 5 belongs to classes 1 and 2)
    # image 5 was class 1's turn of the first round; class 2 (whose best, 5, is placed) gives its
    # next one (7) in the same round; class 1's second image (3) waits for round two
    assert out[1:] == [7, 3]
    with pytest.raises(ValueError, match="order"):
        rating_order(_recs(), distances=d, order="best")
    with pytest.raises(ValueError, match="distances"):
        rating_order(_recs())
    assert rating_order([], distances=np.zeros((1, 0))).tolist() == []


def test_rating_order_on_random_inputs_is_a_permutation_of_m():
    n, m, c = 300, 3, 6
    ta, ca, d = random_problem(0, n, m, c)
    recs = mad_select(ta, ca, d, np.tile([[0.05, 0.5]], (c, 1)), 4)
    m_set = sorted({r.image for r in recs})
    for order in ("failures", "rank"):
        out = rating_order(recs, ta, ca, d, order=order)
        assert sorted(out.tolist()) == m_set


def test_below_median_candidates_wait_until_every_class_has_shown_its_likely_failures():
    # 10 images, one competitor; the pool median of the evidence lies between images 4 and 5
    d = np.array([np.linspace(0.0, 0.9, 10)])  # image i has distance 0.1 i
    recs = [MadRecord(9, 0, 1, "target", 0.9, 1), MadRecord(8, 0, 1, "target", 0.8, 2),
            MadRecord(7, 0, 1, "target", 0.7, 3),
            MadRecord(2, 0, 2, "target", 0.2, 1),  # class 2's only candidate: below the median
            MadRecord(6, 0, 3, "target", 0.6, 1)]
    out = rating_order(recs, distances=d).tolist()
    # above the median: classes 1 and 3 take turns (9, 6), then class 1's rest (8, 7); then image 2
    assert out == [9, 6, 8, 7, 2]
    # the paper's order puts the weak rank-1 pick first among rank-1 picks by distance
    assert rank_order(recs).tolist() == [9, 6, 2, 8, 7]
