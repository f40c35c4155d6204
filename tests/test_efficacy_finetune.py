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


def _rows(gains: dict[str, tuple[float, float, float]]) -> dict:
    return {f"{m}/n4=40/failures": {"dev_failure_zone.miou.delta": {"mean": fz},
                                    "dev_random.miou.delta": {"mean": rnd},
                                    "dev_t0.gt_miou.delta": {"mean": t0}}
            for m, (fz, rnd, t0) in gains.items()}


def test_choose_dev_applies_the_rule():
    # T(0) floor -0.01, random floor -0.005; the largest failure-zone gain among those qualifying
    got = choose_dev(_rows({"all_lr3e-5": (0.0, 0.0, -0.02), "balanced_lr3e-5": (0.003, 0.002, -0.005),
                            "lwf_lr3e-5": (0.001, 0.001, -0.009), "ema_lr3e-5": (0.05, -0.006, 0.0)}))
    assert got["qualifying"] == ["balanced_lr3e-5", "lwf_lr3e-5"] and got["chosen"] == "balanced_lr3e-5"
    # a tie within 0.001 with a qualifying reference keeps the reference
    got = choose_dev(_rows({"all_lr3e-5": (0.002, 0.0, 0.0), "ema_lr3e-5": (0.0025, 0.0, 0.0)}))
    assert got["chosen"] == "all_lr3e-5"
    # none qualifies: a method better on all three sets replaces the reference, else it stays
    got = choose_dev(_rows({"all_lr3e-5": (0.0, -0.01, -0.03), "ema_lr3e-5": (0.001, -0.009, -0.02)}))
    assert got["qualifying"] == [] and got["chosen"] == "ema_lr3e-5"
    got = choose_dev(_rows({"all_lr3e-5": (0.0, -0.01, -0.03), "ema_lr3e-5": (0.01, -0.02, -0.02)}))
    assert got["chosen"] == "all_lr3e-5"
    # a pseudo-label winner is flagged: it needs the competitors' predictions in the round
    got = choose_dev(_rows({"all_lr3e-5": (0.0, 0.0, -0.02), "pseudo_lr3e-5": (0.01, 0.0, 0.0)}))
    assert got["chosen"] == "pseudo_lr3e-5" and got["needs_competitors"]
    assert choose_dev(_rows({"ema_lr3e-5": (0.0, 0.0, 0.0)}))["chosen"] is None  # no reference yet


def test_named_methods_pin_their_sampling():
    assert all(cfg.get("sampling") in ("uniform", "balanced") for m, cfg in METHODS.items() if m != "default")
