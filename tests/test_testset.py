"""Choosing the unbiased test set T(i+1) (projects.evaluation.testset)."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.classes import VOC_CLASSES
from projects.evaluation.testset import choose_test_set, main_classes


def test_main_classes_largest_foreground_ties_and_background() -> None:
    areas = np.zeros((4, 21))
    areas[0, [0, 3, 15]] = [0.7, 0.1, 0.2]  # person largest
    areas[1, [0, 5, 9]] = [0.5, 0.25, 0.25]  # tie -> smaller index
    areas[2, 0] = 1.0  # no foreground
    areas[3, [0, 1]] = [0.99, 0.01]  # background larger but ignored
    assert main_classes(areas).tolist() == [15, 5, 0, 1]
    with pytest.raises(ValueError, match="shape"):
        main_classes(np.zeros(5))


def _pool(n_per_class: dict[int, int]) -> tuple[list[str], dict[str, int]]:
    ids, mc = [], {}
    for k, n in n_per_class.items():
        for j in range(n):
            iid = f"img{k:02d}_{j:02d}"
            ids.append(iid)
            mc[iid] = k
    return ids, mc


def test_rules_drop_ood_and_used_cap_per_class_and_size() -> None:
    ids, mc = _pool({15: 10, 12: 6, 8: 3, 0: 5, 3: 1})
    ood = {"img15_00", "img15_01", "img03_00"}
    used = {"img12_00", "img15_02", "img15_00"}  # img15_00 is both: counted as OOD
    ch = choose_test_set(ids, mc, ood=ood, used=used, size=30, max_per_class=4, seed=0)
    assert set(ch.ids).isdisjoint(ood | used)
    assert ch.dropped_ood == ["img15_00", "img15_01", "img03_00"]
    assert ch.dropped_used == ["img15_02", "img12_00"]
    # 4 person + 4 dog + 3 cat + 4 background = 15 < 30: everything the caps allow
    assert ch.per_class == {"background": 4, "cat": 3, "dog": 4, "person": 4}
    assert ch.available == {"background": 5, "cat": 3, "dog": 5, "person": 7}
    assert len(ch.ids) == 15 and ch.shortfall == 15
    counts = {}
    for i in ch.ids:
        counts[mc[i]] = counts.get(mc[i], 0) + 1
    assert max(counts.values()) <= 4
    d = ch.to_dict()
    assert d["shortfall"] == 15 and d["ids"] == ch.ids


def test_size_limit_spreads_over_classes_round_robin() -> None:
    ids, mc = _pool({k: 6 for k in range(1, 21)})  # 20 classes x 6 images
    ch = choose_test_set(ids, mc, size=30, max_per_class=4, seed=3)
    assert len(ch.ids) == 30 and ch.shortfall == 0
    assert len(set(ch.ids)) == 30
    # the first pass takes one image of every class before any class gets a second
    assert sorted(mc[i] for i in ch.ids[:20]) == list(range(1, 21))
    assert sorted(ch.per_class.values()) == [1] * 10 + [2] * 10
    assert set(ch.per_class) <= set(VOC_CLASSES[1:])


def test_deterministic_order_independent_and_seed_dependent() -> None:
    ids, mc = _pool({k: 7 for k in range(1, 21)} | {0: 9})
    a = choose_test_set(ids, mc, seed=5)
    b = choose_test_set(list(reversed(ids)) + ids[:10], mc, seed=5)  # other order, duplicates
    assert a.ids == b.ids
    c = choose_test_set(ids, mc, seed=6)
    assert c.ids != a.ids
    # aligned sequence form gives the same result as the mapping form
    seq = choose_test_set(ids, [mc[i] for i in ids], seed=5)
    assert seq.ids == a.ids


def test_fewer_candidates_than_size_and_empty() -> None:
    ch = choose_test_set([], {}, size=30)
    assert ch.ids == [] and ch.shortfall == 30 and ch.per_class == {}
    ch = choose_test_set(["a", "b"], {"a": 1, "b": 1}, size=30, max_per_class=1)
    assert len(ch.ids) == 1 and ch.available == {"aeroplane": 2}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no entry for candidate"):
        choose_test_set(["a"], {})
    with pytest.raises(ValueError, match="1 entries for 2 candidates"):
        choose_test_set(["a", "b"], [1])
    with pytest.raises(ValueError, match="outside 0..20"):
        choose_test_set(["a"], {"a": 21})
    with pytest.raises(ValueError, match=">= 1"):
        choose_test_set(["a"], {"a": 1}, size=0)
