"""Unit tests of sampler.bounds (size bounds from masks) and sampler.baselines."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from sampler.baselines import entropy_select, random_select
from sampler.bounds import bounds_from_fractions, bounds_from_masks, class_area_fractions


def _mask_with_area(frac: float, cls: int, size: int = 100) -> np.ndarray:
    m = np.zeros(size * size, np.uint8)
    m[: int(round(frac * size * size))] = cls
    return m.reshape(size, size)


def test_class_area_fractions_count_all_pixels_and_skip_ignore():
    m = np.array([[0, 1], [255, 1]], np.uint8)
    assert class_area_fractions(m, 3).tolist() == [0.25, 0.5, 0.0]


def test_quartiles_of_occurrences_only():
    fracs = [0.1, 0.2, 0.3, 0.4, 0.5]
    masks = [_mask_with_area(f, 1) for f in fracs] + [np.zeros((100, 100), np.uint8)] * 3
    b = bounds_from_masks(masks, 2, "quartiles", min_count=5)
    assert b.shape == (2, 2)
    assert b[1] == pytest.approx(np.percentile(fracs, [25, 75]))


def test_mean_std_clipped_to_min_max():
    fracs = np.array([0.01, 0.01, 0.01, 0.01, 0.9])
    masks = [_mask_with_area(f, 1) for f in fracs]
    b = bounds_from_masks(masks, 2, "mean_std", min_count=5)
    mean, std = fracs.mean(), fracs.std()
    assert b[1, 0] == pytest.approx(max(mean - std, 0.01))
    assert b[1, 0] == pytest.approx(0.01)  # mean - std < min -> clipped
    assert b[1, 1] == pytest.approx(min(mean + std, 0.9))


def test_rare_class_falls_back_to_pooled_and_is_logged(caplog):
    # class 1 occurs 6 times, class 2 only twice
    masks = [_mask_with_area(f, 1) for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
    masks += [_mask_with_area(0.05, 2), _mask_with_area(0.07, 2)]
    with caplog.at_level(logging.WARNING, logger="sampler.bounds"):
        b = bounds_from_masks(masks, 3, min_count=5, class_names=["bg", "cat", "dog"])
    pooled = np.percentile([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.05, 0.07], [25, 75])
    assert b[2] == pytest.approx(pooled)
    assert "dog" in caplog.text and "fallback" in caplog.text
    assert "cat" not in caplog.text


def test_fallback_none_and_explicit_and_empty_input():
    fr = np.array([[0.5, 0.5, 0.0]])
    assert bounds_from_fractions(fr, min_count=5, fallback="none")[1].tolist() == [0.0, 1.0]
    assert bounds_from_fractions(fr, min_count=5, fallback=(0.01, 0.2))[2].tolist() == [0.01, 0.2]
    assert bounds_from_masks([], 3).tolist() == [[0.0, 1.0]] * 3
    with pytest.raises(ValueError, match="method"):
        bounds_from_fractions(fr, method="median")


def test_entropy_select_top_n_with_ties():
    e = np.array([0.1, 0.9, 0.5, 0.9, 0.2])
    assert entropy_select(e, 3).tolist() == [1, 3, 2]
    assert entropy_select(e, 10).tolist() == [1, 3, 2, 4, 0]
    assert entropy_select(e, 0).tolist() == []


def test_random_select_is_seeded_distinct_and_bounded():
    a = random_select(100, 10, seed=3)
    assert a.tolist() == random_select(100, 10, seed=3).tolist()
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
    assert a.tolist() != random_select(100, 10, seed=4).tolist()
    assert sorted(random_select(5, 10, seed=0).tolist()) == [0, 1, 2, 3, 4]


# ---- the per-class rule (sampler.bounds.class_bounds) ----------------------------------------


def _areas(rows: list[dict[int, float]], c: int = 4) -> np.ndarray:
    a = np.zeros((len(rows), c))
    for i, r in enumerate(rows):
        for k, v in r.items():
            a[i, k] = v
        a[i, 0] = 1.0 - a[i, 1:].sum()
    return a


def test_auto_rule_s0_where_enough_masks_else_pool_predictions_else_none(caplog):
    from sampler.bounds import class_bounds

    # S(0): class 1 in 5 masks, class 2 in 2 masks, class 3 never
    s0 = _areas([{1: f} for f in (0.1, 0.2, 0.3, 0.4, 0.5)] + [{2: 0.05}, {2: 0.07}])
    # pool: the target predicts class 2 on 3 images, a competitor on 3 more; class 3 only twice
    ta = _areas([{2: 0.01}, {2: 0.02}, {2: 0.03}, {3: 0.5}, {}, {}])
    ca = _areas([{}, {}, {}, {3: 0.4}, {2: 0.04}, {2: 0.05}])[None]
    ca[0, 0, 2] = 0.06  # the competitor also predicts class 2 on image 0
    with caplog.at_level(logging.INFO, logger="sampler.bounds"):
        b, rep = class_bounds(s0, ta, ca, "auto", "quartiles", min_count=5, class_names=["bg", "a", "b", "c"])
    assert b[1] == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4, 0.5], [25, 75]))
    pool2 = [0.01, 0.02, 0.03, 0.06, 0.04, 0.05]  # one value per (model, image) predicting class 2
    assert b[2] == pytest.approx(np.percentile(pool2, [25, 75]))
    assert b[3].tolist() == [0.0, 1.0]
    assert rep["classes"]["a"] == {"source": "s0", "s0_masks": 5, "pool_predictions": 0,
                                   "bounds": [0.2, 0.4]}
    assert rep["classes"]["b"]["source"] == "pool" and rep["classes"]["b"]["pool_predictions"] == 6
    assert rep["classes"]["c"]["source"] == "none" and rep["classes"]["c"]["pool_predictions"] == 2
    assert rep["counts"] == {"s0": 1, "s0_pooled": 0, "pool": 1, "none": 1}
    assert (rep["rule"], rep["method"], rep["min_count"]) == ("auto", "quartiles", 5)
    assert "b: [" in caplog.text and "from pool" in caplog.text
    json.dumps(rep)  # the round stores it as is


def test_s0_rule_is_the_paper_rule_and_other_rules():
    from sampler.bounds import class_bounds

    s0 = _areas([{1: f} for f in (0.1, 0.2, 0.3, 0.4, 0.5)] + [{2: 0.05}, {2: 0.07}])
    ta = _areas([{2: 0.9}] * 6)
    ca = np.zeros((0, 6, 4))
    b, rep = class_bounds(s0, ta, ca, "s0", min_count=5)
    np.testing.assert_allclose(b, bounds_from_fractions(s0, min_count=5))  # pooled fallback for 2 and 3
    assert [rep["classes"][k]["source"] for k in "123"] == ["s0", "s0_pooled", "s0_pooled"]
    b, rep = class_bounds(s0, ta, ca, "pool", min_count=5)
    assert b[1].tolist() == [0.0, 1.0] and b[2].tolist() == [0.9, 0.9]  # S(0) ignored
    b, rep = class_bounds(None, ta, ca, "none")
    assert b.tolist() == [[0.0, 1.0]] * 4 and rep["counts"]["none"] == 3
    b, _ = class_bounds(None, ta, ca, "auto", min_count=5)  # no S(0): the pool for every class
    assert b[2].tolist() == [0.9, 0.9] and b[1].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="rule"):
        class_bounds(s0, ta, ca, "paper")
    with pytest.raises(ValueError, match="s0_fractions"):
        class_bounds(s0[:, :3], ta, ca, "auto")
