"""Unit tests of sampler.select.mad_select against hand-made cases and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from sampler import select as select_mod
from sampler.select import PARTITIONS, MadRecord, mad_select, records_by_image, selected_images


def brute_force(ta, ca, d, bounds, n3):
    """Direct transcription of the selection rule, one problem at a time, with Python sorting."""
    out = []
    m, n, c = ca.shape
    for j in range(m):
        for k in range(1, c):
            for part in PARTITIONS:
                areas = ta if part == "target" else ca[j]
                elig = [i for i in range(n)
                        if areas[i, k] > 0 and bounds[k, 0] <= areas[i, k] <= bounds[k, 1]]
                elig.sort(key=lambda i: (-float(d[j, i]), i))
                for r, i in enumerate(elig[:n3]):
                    out.append(MadRecord(i, j, k, part, float(d[j, i]), r + 1))
    return out


def random_problem(seed: int, n: int, m: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random selection problem: target areas [n, c] and competitor areas [m, n, c] (Dirichlet rows
    that sum to 1) and distances [m, n] in [0, 1), drawn in that order from ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    ta = rng.dirichlet(np.ones(c), n)
    ca = rng.dirichlet(np.ones(c), (m, n))
    d = rng.random((m, n))
    return ta, ca, d


def _areas(rows):
    a = np.array(rows, dtype=np.float64)
    return a


def test_hand_made_case_with_ties_and_record_order():
    # 5 images, 3 classes, 1 competitor
    ta = _areas([[0.5, 0.5, 0.0],
                 [0.9, 0.1, 0.0],
                 [0.6, 0.4, 0.0],
                 [0.7, 0.3, 0.0],
                 [1.0, 0.0, 0.0]])
    ca = _areas([[[0.5, 0.0, 0.5],
                  [0.5, 0.2, 0.3],
                  [1.0, 0.0, 0.0],
                  [0.8, 0.0, 0.2],
                  [0.9, 0.0, 0.1]]])
    d = np.array([[0.3, 0.7, 0.7, 0.1, 0.9]])
    bounds = np.array([[0.0, 1.0], [0.2, 0.5], [0.15, 1.0]])
    rec = mad_select(ta, ca, d, bounds, n3=2)
    # class 1, target: eligible {0 (0.5), 2 (0.4), 3 (0.3)}; 1 has 0.1 < 0.2
    #   -> image 2 (0.7), then 0 (0.3)
    # class 1, competitor: eligible {1 (0.2)} -> just image 1
    # class 2, target: nobody -> empty class
    # class 2, competitor: eligible {0 (0.5), 1 (0.3), 3 (0.2)}; 4 has 0.1 < 0.15
    #   -> image 1 (0.7), then 0 (0.3)
    assert rec == [
        MadRecord(2, 0, 1, "target", 0.7, 1),
        MadRecord(0, 0, 1, "target", 0.3, 2),
        MadRecord(1, 0, 1, "competitor", 0.7, 1),
        MadRecord(1, 0, 2, "competitor", 0.7, 1),
        MadRecord(0, 0, 2, "competitor", 0.3, 2),
    ]
    assert rec == brute_force(ta, ca, d, bounds, 2)
    assert selected_images(rec).tolist() == [0, 1, 2]


def test_ties_break_by_smaller_index():
    n = 6
    ta = np.zeros((n, 2))
    ta[:, 1] = 0.5
    ta[:, 0] = 0.5
    ca = ta[None].copy()
    d = np.array([[0.2, 0.5, 0.5, 0.9, 0.5, 0.5]])
    bounds = np.array([[0.0, 1.0], [0.0, 1.0]])
    rec = mad_select(ta, ca, d, bounds, n3=4)
    target = [r.image for r in rec if r.partition == "target"]
    assert target == [3, 1, 2, 4]
    assert [r.rank for r in rec if r.partition == "target"] == [1, 2, 3, 4]


def test_area_zero_is_never_eligible_even_if_lower_bound_is_zero():
    ta = np.array([[1.0, 0.0], [0.5, 0.5]])
    ca = ta[None].copy()
    d = np.array([[0.9, 0.1]])
    rec = mad_select(ta, ca, d, np.array([[0, 1], [0, 1]]), n3=5)
    assert {r.image for r in rec} == {1}


def test_bounds_are_inclusive():
    ta = np.array([[0.8, 0.2], [0.6, 0.4], [0.5, 0.5]])
    ca = ta[None].copy()
    d = np.array([[0.1, 0.2, 0.3]])
    rec = mad_select(ta, ca, d, np.array([[0, 1], [0.2, 0.4]]), n3=5)
    assert sorted({r.image for r in rec}) == [0, 1]


def test_image_chosen_by_several_problems():
    # image 0 has the largest distance for both competitors, and classes 1 and 2 in both partitions
    ta = np.array([[0.4, 0.3, 0.3], [0.8, 0.2, 0.0], [0.8, 0.0, 0.2]])
    ca = np.stack([ta, ta])
    d = np.array([[0.9, 0.5, 0.4], [0.8, 0.1, 0.2]])
    rec = mad_select(ta, ca, d, np.array([[0, 1]] * 3), n3=1)
    assert len(rec) == 2 * 2 * 2
    assert all(r.image == 0 and r.rank == 1 for r in rec)
    groups = records_by_image(rec)
    assert list(groups) == [0]
    assert len(groups[0]) == 8
    assert rec == brute_force(ta, ca, d, np.array([[0, 1]] * 3), 1)


def test_n3_larger_than_eligible_set_returns_all_eligible():
    rng = np.random.default_rng(0)
    ta = rng.dirichlet(np.ones(4), size=10)
    ca = rng.dirichlet(np.ones(4), size=(2, 10))
    d = rng.random((2, 10))
    bounds = np.array([[0, 1]] * 4, dtype=float)
    rec = mad_select(ta, ca, d, bounds, n3=1000)
    assert len(rec) == 2 * 3 * 2 * 10
    assert rec == brute_force(ta, ca, d, bounds, 1000)


def test_empty_pool_empty_classes_and_zero_n3():
    assert mad_select(np.zeros((0, 3)), np.zeros((2, 0, 3)), np.zeros((2, 0)), np.zeros((3, 2)), 5) == []
    ta = np.tile([1.0, 0.0, 0.0], (4, 1))  # nobody predicts classes 1, 2
    assert mad_select(ta, ta[None], np.ones((1, 4)), np.array([[0, 1]] * 3), 3) == []
    ta2 = np.tile([0.5, 0.5, 0.0], (4, 1))
    assert mad_select(ta2, ta2[None], np.ones((1, 4)), np.array([[0, 1]] * 3), 0) == []


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="competitor_areas"):
        mad_select(np.zeros((3, 2)), np.zeros((1, 4, 2)), np.zeros((1, 3)), np.zeros((2, 2)), 1)
    with pytest.raises(ValueError, match="distances"):
        mad_select(np.zeros((3, 2)), np.zeros((1, 3, 2)), np.zeros((2, 3)), np.zeros((2, 2)), 1)
    with pytest.raises(ValueError, match="bounds"):
        mad_select(np.zeros((3, 2)), np.zeros((1, 3, 2)), np.zeros((1, 3)), np.zeros((3, 2)), 1)
    with pytest.raises(ValueError, match="NaN"):
        mad_select(np.zeros((3, 2)), np.zeros((1, 3, 2)), np.full((1, 3), np.nan), np.zeros((2, 2)), 1)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n, m, c = int(rng.integers(20, 300)), int(rng.integers(1, 4)), int(rng.integers(2, 7))

    def areas(size):
        a = rng.random(size)
        a[a < 0.6] = 0
        a[..., 0] += 0.2
        return a / a.sum(-1, keepdims=True)

    ta = areas((n, c)).astype(np.float32)
    ca = areas((m, n, c)).astype(np.float32)
    d = np.round(rng.random((m, n)), 1)  # coarse values -> many ties
    lo = rng.random(c) * 0.3
    bounds = np.stack([lo, lo + rng.random(c) * 0.7], axis=1)
    n3 = int(rng.integers(1, 40))
    assert mad_select(ta, ca, d, bounds, n3) == brute_force(ta, ca, d, bounds, n3)


def test_records_by_image_orders_by_best_rank():
    rec = [MadRecord(5, 0, 1, "target", 0.5, 3), MadRecord(5, 1, 2, "competitor", 0.4, 1),
           MadRecord(2, 0, 1, "target", 0.9, 1), MadRecord(7, 0, 3, "target", 0.1, 2)]
    groups = records_by_image(rec)
    assert list(groups) == [2, 5, 7]
    assert [r.rank for r in groups[5]] == [1, 3]


@pytest.mark.parametrize("seed", range(4))
def test_prefix_and_rare_class_paths_match_brute_force(seed, monkeypatch):
    """Small prefix sizes force both the prefix path and the rare-class path on every problem mix."""
    monkeypatch.setattr(select_mod, "_PREFIX_MIN", 5)
    monkeypatch.setattr(select_mod, "_PREFIX_FACTOR", 1)
    rng = np.random.default_rng(100 + seed)
    n, m, c = 400, 2, 6
    ta = rng.random((n, c)) * (rng.random((n, c)) < np.linspace(0.9, 0.02, c))  # class 5 is rare
    ca = rng.random((m, n, c)) * (rng.random((m, n, c)) < 0.3)
    d = np.round(rng.random((m, n)), 2)
    bounds = np.array([[0.0, 1.0], [0.1, 0.9], [0.0, 0.5], [0.3, 1.0], [0.0, 1.0], [0.0, 1.0]])
    for n3 in (1, 3, 17):
        assert mad_select(ta, ca, d, bounds, n3) == brute_force(ta, ca, d, bounds, n3)


def test_n3_for_size_grows_m_to_a_rating_budget():
    from sampler.select import n3_for_size, selected_images

    n, m, c = 200, 2, 5
    ta, ca, d = random_problem(3, n, m, c)
    bounds = np.tile([[0.05, 0.6]], (c, 1))

    def size(k):
        return selected_images(mad_select(ta, ca, d, bounds, k)).size

    assert n3_for_size(ta, ca, d, bounds, 2, 1) == 2  # M already large enough
    k = n3_for_size(ta, ca, d, bounds, 2, 60)
    assert size(k) >= 60 and size(k - 1) < 60 and k > 2  # the smallest n3 that reaches 60
    top = size(n)
    k = n3_for_size(ta, ca, d, bounds, 2, 10 * n)  # more than the bounds allow: the largest M
    assert size(k) == top and size(k - 1) < top
