"""The selection benchmark's pure helpers (benchmarks/efficacy_selection.py)."""

from __future__ import annotations

import numpy as np

from benchmarks.efficacy_selection import aggregate, keep_lowest, pick_stats, targets


def test_keep_lowest_ties_follow_the_rated_order_and_skip_out_of_domain():
    mos = np.array([1.0, 1.0, np.inf, 2.0, 1.0, 1.0 / 3.0 + 1.0])
    rated = np.array([4, 0, 2, 3, 1])
    assert keep_lowest(rated, mos, 2).tolist() == [4, 0]  # three tie at 1.0: the first two rated
    assert keep_lowest(rated, mos, 10).tolist() == [4, 0, 1, 3]  # the out-of-domain image never
    tie = np.array([0.0, 0.9, 0.0, 0.0, 0.1, 0.0])
    assert keep_lowest(rated, mos, 2, tie).tolist() == [1, 4]  # ties by the larger tie score


def test_pick_stats_and_targets():
    q = np.array([0.1, 0.6, 0.3])
    gc = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=bool)
    assert pick_stats(np.array([0, 2]), q, gc) == (0.2, 1.0, 3)  # background (column 0) not counted
    assert pick_stats(np.array([], dtype=int), q, gc)[2] == 0
    names = ["MAD + rating", "entropy"] + [f"{s}, R={b}" for s in ("MAD first R", "entropy top R", "random R")
                                           for b in ("pool/2", "pool/4")]
    per = []
    for k in range(10):  # MAD better than entropy on both in 9 of 10 sub-pools
        good = k < 9
        row = {name: {10: (0.3, 1.0, 8)} for name in names}
        row["MAD + rating"] = {10: (0.2 if good else 0.4, 1.0, 10 if good else 7)}
        row["MAD first R, R=pool/2"] = {10: (0.32, 1.0, 11)}
        row["random R, R=pool/2"] = {10: (0.36, 1.0, 9)}
        per.append(row)
    agg = aggregate(per, [10])
    assert agg["selections"]["MAD + rating"]["10"]["wins_vs_entropy"] == {"miou": 9, "classes": 9, "both": 9,
                                                                          "of": 10}
    tg = targets(agg, [10])
    assert tg["n=10: MAD+rating beats entropy on both in >= 90%"] == {"value": "9/10", "met": True}
    assert tg["n=10, R=pool/2: classes vs entropy >= +2"]["met"] is True  # 11 vs 8
    assert tg["n=10, R=pool/2: mIoU within 0.03 of entropy"]["met"] is True  # 0.32 vs 0.30
    assert tg["n=10, R=pool/2: mIoU >= 0.03 below random"]["met"] is True  # 0.32 vs 0.36
    assert tg["n=10, R=pool/4: classes vs entropy >= +2"]["met"] is False  # 8 vs 8


def test_ceiling_gap_says_what_any_order_can_reach():
    from benchmarks.efficacy_selection import ALL_RATED, ceiling_gaps, format_ceiling

    names = [ALL_RATED] + [f"{s}, R={b}" for s in ("MAD first R", "random R") for b in ("pool/2", "pool/4")]
    per = []
    for _ in range(4):
        row = {name: {10: (0.30, 1.0, 8)} for name in names}
        row["entropy"] = {10: (0.4, 1.0, 6)}
        row[ALL_RATED] = {10: (0.22, 1.0, 9)}
        row["MAD first R, R=pool/2"] = {10: (0.23, 1.0, 9)}
        row["random R, R=pool/2"] = {10: (0.24, 1.0, 9)}
        per.append(row)
    gaps = ceiling_gaps(aggregate(per, [10]), [10])
    half = gaps["n=10, R=pool/2"]
    # rating everything is only 0.02 below R random: no order can be 0.03 below it
    assert half["ceiling_gap"] == 0.02 and half["MAD_gap"] == 0.01
    quarter = gaps["n=10, R=pool/4"]
    assert quarter["ceiling_gap"] == 0.08  # positive control: here a better order has room
    assert "+0.020" in format_ceiling(gaps)
