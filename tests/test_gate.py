"""ml_backend.gate: the promotion gate on synthetic per-image confusion matrices."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.gate import GateCriteria, bootstrap_delta, compare_set, decide
from ml_backend.metrics import confusion_matrix

C = 21


def _cms(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """(N, C, C) confusions of (pred, gt) label maps."""
    return np.stack([confusion_matrix(p, g, C) for p, g in pairs])


def _image(cls: int, size: int = 40) -> np.ndarray:
    gt = np.zeros((size, size), np.uint8)
    gt[10:30, 10:30] = cls
    return gt


def _pred(gt: np.ndarray, wrong_rows: int, as_cls: int = 0) -> np.ndarray:
    """The ground truth with the first ``wrong_rows`` rows of the object predicted as ``as_cls``."""
    p = gt.copy()
    p[10:10 + wrong_rows, 10:30] = as_cls
    return p


def _set(classes: list[int], wrong_rows: int) -> np.ndarray:
    return _cms([(_pred(_image(k), wrong_rows), _image(k)) for k in classes])


def test_the_one_spurious_class_case_passes() -> None:
    """T(0) of 7 images: the child paints a small spurious "sheep" on the cow image. The standard
    mIoU falls by far more than 0.01 (a new zero-IoU class), the gt-class mIoU barely moves."""
    classes = [10, 12, 15, 7, 3, 8, 1]  # cow first
    gts = [_image(k) for k in classes]
    parent = _cms([(g, g) for g in gts])
    child_preds = [g.copy() for g in gts]
    child_preds[0][10:11, 10:12] = 17  # 2 cow pixels -> sheep
    child = _cms(list(zip(child_preds, gts, strict=True)))
    fz = _set([5, 9], 2)
    d = decide(parent, child, fz, fz)
    t0 = d.metrics["T(0)"]
    assert t0.parent_miou - t0.child_miou > 0.1  # the standard metric would have rejected it
    assert abs(t0.delta_gt_miou) < 0.01
    assert d.promoted, d.reasons
    assert d.status == "promoted" and any(r.startswith("T(0): ok") for r in d.reasons)


def test_real_forgetting_on_t0_is_rejected_with_reason() -> None:
    classes = [10, 12, 15, 7]
    parent = _set(classes, 0)
    child = _set(classes, 8)  # 40% of every object lost
    fz_parent, fz_child = _set([5], 6), _set([5], 0)  # better on the failures
    d = decide(parent, child, fz_parent, fz_child)
    assert not d.promoted and d.status == "rejected"
    assert d.reasons[0].startswith("T(0): forgetting")
    assert "tolerance 0.010" in d.reasons[0]
    assert d.metrics["failure images"].delta_gt_miou > 0


def test_worse_on_the_failure_images_is_rejected() -> None:
    t0 = _set([10, 12], 0)
    d = decide(t0, t0, _set([5, 9, 11], 2), _set([5, 9, 11], 6))
    assert not d.promoted
    assert d.reasons[0].startswith("failure images: worse")
    assert d.metrics["failure images"].delta_gt_miou < 0


def test_improving_version_is_promoted_and_the_interval_is_above_zero() -> None:
    t0 = _set([10, 12], 0)
    cls = [5, 9, 11, 14, 16, 18]
    d = decide(t0, t0, _set(cls, 8), _set(cls, 1), GateCriteria(require_failure_gain=True))
    fz = d.metrics["failure images"]
    assert d.promoted, d.reasons
    assert fz.delta_gt_miou > 0.1 and fz.ci_low is not None and fz.ci_low > 0


def test_require_gain_rejects_a_neutral_version() -> None:
    t0 = _set([10, 12], 0)
    fz = _set([5, 9], 3)
    assert decide(t0, t0, fz, fz).promoted  # not worse: promoted by default
    d = decide(t0, t0, fz, fz, GateCriteria(require_failure_gain=True))
    assert not d.promoted and "no clear gain" in d.reasons[0]


def test_missing_gate_data_never_promotes_silently() -> None:
    t0 = _set([10, 12], 0)
    d = decide(None, None, t0, t0)
    assert not d.promoted and "no images to check forgetting" in d.reasons[0]
    d = decide(t0, t0)
    assert not d.promoted and "no held-out labelled failure images" in d.reasons[0]
    d = decide(t0, t0, criteria=GateCriteria(require_failures=False))
    assert d.promoted and any("decided on T(0) alone" in r for r in d.reasons)
    empty = np.zeros((0, C, C), np.int64)
    assert not decide(empty, empty, t0, t0).promoted


def test_tolerance_is_a_margin_on_t0() -> None:
    classes = [10, 12, 15, 7]
    parent = _set(classes, 0)
    child = _set(classes, 1)  # every object loses 1 of 20 rows
    drop = -compare_set("x", parent, child, GateCriteria()).delta_gt_miou
    assert 0.01 < drop < 0.1
    fz = _set([5], 0)
    assert not decide(parent, child, fz, fz).promoted
    assert decide(parent, child, fz, fz, GateCriteria(t0_tolerance=drop + 1e-6)).promoted


def test_bootstrap_is_paired_and_deterministic() -> None:
    p = _set([5, 9, 11, 14], 4)
    ci = bootstrap_delta(p, p, 200, 0.95)
    assert ci == (0.0, 0.0)  # identical models: every paired resample gives 0
    q = _set([5, 9, 11, 14], 1)
    a = bootstrap_delta(p, q, 200, 0.9, seed=3)
    assert a == bootstrap_delta(p, q, 200, 0.9, seed=3)
    assert a is not None and 0 < a[0] <= a[1]
    assert bootstrap_delta(p[:1], q[:1], 200, 0.9) is None


def test_decision_json_and_bad_inputs() -> None:
    t0 = _set([10], 0)
    d = decide(t0, t0, t0, t0)
    js = d.to_json()
    assert js["format"] == "madseg-gate/1" and js["promoted"] is True
    assert set(js["metrics"]) == {"T(0)", "failure images"}
    assert js["metrics"]["T(0)"]["n_images"] == 1 and js["criteria"]["t0_tolerance"] == 0.01
    with pytest.raises(ValueError, match="same images"):
        compare_set("T(0)", t0, _set([10, 12], 0), GateCriteria())
    with pytest.raises(ValueError, match="unknown gate setting"):
        GateCriteria.from_dict({"tolerance": 1})
    assert GateCriteria.from_dict({"t0_tolerance": 0.05}).t0_tolerance == 0.05
    with pytest.raises(ValueError):
        GateCriteria(t0_tolerance=-1)


def test_anchor_stops_small_drops_from_adding_up() -> None:
    """Each promotion may lose up to the tolerance against its parent; against the original f(0)
    the total loss is bounded by the same tolerance."""
    classes = [10, 12, 15, 7]
    f0 = _set(classes, 0)
    parent = _set(classes, 1)  # already a bit below f(0) (let through by a wider earlier tolerance)
    child = _set(classes, 1)  # no worse than its parent
    fz = _set([5], 0)
    assert decide(parent, child, fz, fz).promoted  # against the parent alone: fine
    d = decide(parent, child, fz, fz, t0_anchor=f0)
    assert not d.promoted and d.reasons[0].startswith("T(0): forgetting against f(0)")
    assert d.metrics["T(0) vs f(0)"].delta_gt_miou < -0.01
    assert decide(f0, f0, fz, fz, t0_anchor=f0).promoted  # positive control
