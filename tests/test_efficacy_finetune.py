"""The fine-tune benchmark's pure helpers (benchmarks/efficacy_finetune.py): the leak-free dev
split and the dev choice rule."""

from __future__ import annotations

import numpy as np

from benchmarks.efficacy_finetune import METHODS, choose_dev, dev_split


def test_dev_split_is_disjoint_stratified_and_deterministic():
    miou = np.linspace(0.0, 1.0, 100)
    rest = np.arange(3, 64)  # 61 images: the reservoir gets the odd one
    reservoir, dev_eval = dev_split(rest, miou, 0)
    assert len(reservoir) == 31 and len(dev_eval) == 30
    assert not set(reservoir.tolist()) & set(dev_eval.tolist())
    assert sorted(reservoir.tolist() + dev_eval.tolist()) == rest.tolist()
    # one image of each consecutive (by f(0) mIoU) pair goes to each part: same difficulty
    assert abs(miou[reservoir[:30]].mean() - miou[dev_eval].mean()) < 0.011
    again = dev_split(rest, miou, 0)
    assert again[0].tolist() == reservoir.tolist() and again[1].tolist() == dev_eval.tolist()
    assert dev_split(rest, miou, 1)[0].tolist() != reservoir.tolist()


Gains = tuple[float, float, float]  # (dev failure zone, dev random, dev T(0) GT-class)


def _cells(gains: dict[str, Gains | list[Gains]]) -> dict:
    """Dev cells as ``run()`` writes them; one (fz, random, t0) triple = the same on seeds 0, 1, 2."""
    out = {}
    for m, v in gains.items():
        for seed, (fz, rnd, t0) in enumerate(v if isinstance(v, list) else [v] * 3):
            out[f"{m}/seed{seed}/n4=40/failures"] = {
                "method": m, "seed": seed, "n4": 40, "chooser": "failures",
                "delta": {"dev_failure_zone": {"miou": fz, "gt_miou": 0.0},
                          "dev_random": {"miou": rnd, "gt_miou": 0.0},
                          "dev_t0": {"miou": 0.0, "gt_miou": t0}}}
    return out


def test_choose_dev_applies_the_rule_to_the_seed_means():
    # T(0) floor -0.01, random floor -0.005; the largest failure-zone gain among those qualifying
    got = choose_dev(_cells({"all_lr3e-5": (0.0, 0.0, -0.02), "balanced_lr3e-5": (0.003, 0.002, -0.005),
                             "lwf_lr3e-5": (0.001, 0.001, -0.009), "ema_lr3e-5": (0.05, -0.006, 0.0)}))
    assert got["qualifying"] == ["balanced_lr3e-5", "lwf_lr3e-5"] and got["chosen"] == "balanced_lr3e-5"
    assert got["seeds"] == [0, 1, 2] and got["paired"]["balanced_lr3e-5"] == {"mean_diff": 0.003, "se": 0.0}
    # a tie within 0.001 with a qualifying reference keeps the reference
    got = choose_dev(_cells({"all_lr3e-5": (0.002, 0.0, 0.0), "ema_lr3e-5": (0.0025, 0.0, 0.0)}))
    assert got["chosen"] == "all_lr3e-5"
    # none qualifies: a method better on all three sets replaces the reference, else it stays
    got = choose_dev(_cells({"all_lr3e-5": (0.0, -0.01, -0.03), "ema_lr3e-5": (0.002, -0.009, -0.02)}))
    assert got["qualifying"] == [] and got["chosen"] == "ema_lr3e-5"
    got = choose_dev(_cells({"all_lr3e-5": (0.0, -0.01, -0.03), "ema_lr3e-5": (0.01, -0.02, -0.02)}))
    assert got["chosen"] == "all_lr3e-5"
    # a pseudo-label winner is flagged: it needs the competitors' predictions in the round
    got = choose_dev(_cells({"all_lr3e-5": (0.0, 0.0, -0.02), "pseudo_lr3e-5": (0.01, 0.0, 0.0)}))
    assert got["chosen"] == "pseudo_lr3e-5" and got["needs_competitors"]
    assert choose_dev(_cells({"ema_lr3e-5": (0.0, 0.0, 0.0)}))["chosen"] is None  # no reference yet


def test_choose_dev_keeps_the_reference_on_a_noise_level_win():
    ref = [(-0.003, -0.038, -0.018), (0.004, -0.01, -0.012), (0.001, -0.02, -0.015)]
    # per-seed failure-zone differences +0.006, -0.006, +0.008: mean +0.0027 > the 0.001 tie margin,
    # but the standard error of the paired difference is 0.0044: the reference stays
    noisy = [(0.003, 0.002, -0.005), (-0.002, 0.0, -0.006), (0.009, 0.001, -0.004)]
    got = choose_dev(_cells({"all_lr3e-5": ref, "balanced_lr3e-5": noisy}))
    assert got["qualifying"] == ["balanced_lr3e-5"]
    assert got["paired"]["balanced_lr3e-5"]["mean_diff"] == 0.0027
    assert got["paired"]["balanced_lr3e-5"]["se"] > 0.0027
    assert got["chosen"] == "all_lr3e-5" and "standard error" in got["why"]
    # the same method on one dev seed only cannot replace the reference (no standard error)
    one = choose_dev(_cells({"all_lr3e-5": ref, "balanced_lr3e-5": noisy}), seeds=[0])
    assert one["paired"]["balanced_lr3e-5"]["se"] is None and one["chosen"] == "all_lr3e-5"
    # a method missing a dev seed is not chosen
    cells = _cells({"all_lr3e-5": ref, "balanced_lr3e-5": noisy})
    del cells["balanced_lr3e-5/seed2/n4=40/failures"]
    got = choose_dev(cells)
    assert got["incomplete"] == ["balanced_lr3e-5"] and got["chosen"] == "all_lr3e-5"


def test_choose_dev_replaces_the_reference_on_a_clear_win():
    ref = [(-0.003, -0.038, -0.018), (0.004, -0.01, -0.012), (0.001, -0.02, -0.015)]
    # differences +0.013, +0.010, +0.012: mean +0.0117, standard error 0.0009
    clear = [(0.010, 0.002, -0.005), (0.014, 0.0, -0.006), (0.013, 0.001, -0.004)]
    got = choose_dev(_cells({"all_lr3e-5": ref, "balanced_lr3e-5": clear}))
    assert got["paired"]["balanced_lr3e-5"]["se"] < 0.002
    assert got["chosen"] == "balanced_lr3e-5" and not got["needs_competitors"]


def test_named_methods_pin_their_sampling():
    assert all(cfg.get("sampling") in ("uniform", "balanced") for m, cfg in METHODS.items() if m != "default")
