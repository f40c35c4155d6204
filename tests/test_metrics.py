"""ml_backend.metrics: the dataset-level mIoU, checked against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml_backend.metrics import (
    confusion_matrix,
    dataset_miou,
    gt_class_miou,
    iou_per_class,
    miou_from_confusion,
)


def test_confusion_matrix_counts_rows_gt_cols_pred() -> None:
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    cm = confusion_matrix(pred, gt, 3)
    expected = np.array([
        [1, 1, 0],  # gt 0: one correct, one predicted as 1
        [0, 1, 1],  # gt 1: one correct, one predicted as 2
        [0, 0, 1],  # gt 2: correct; the 255 pixel is not counted
    ])
    assert cm.dtype == np.int64
    assert np.array_equal(cm, expected)


def test_iou_and_miou_by_hand() -> None:
    cm = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    # class 0: tp 1, fp 0, fn 1 -> 1/2; class 1: tp 1, fp 1, fn 1 -> 1/3; class 2: tp 1, fp 1 -> 1/2
    ious = iou_per_class(cm)
    assert np.allclose(ious, [0.5, 1 / 3, 0.5])
    assert miou_from_confusion(cm) == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)


def test_classes_absent_from_both_maps_are_not_averaged() -> None:
    gt = np.array([[0, 0], [3, 3]])
    pred = np.array([[0, 0], [3, 0]])
    miou, ious = dataset_miou([(pred, gt)], 5)
    assert math.isnan(ious[1]) and math.isnan(ious[2]) and math.isnan(ious[4])
    # class 0: tp 2, fp 1 -> 2/3 ; class 3: tp 1, fn 1 -> 1/2
    assert ious[0] == pytest.approx(2 / 3) and ious[3] == pytest.approx(0.5)
    assert miou == pytest.approx((2 / 3 + 0.5) / 2)


def test_class_only_predicted_counts_with_iou_zero() -> None:
    gt = np.zeros((2, 2), np.uint8)
    pred = np.array([[0, 0], [0, 7]])
    miou, ious = dataset_miou([(pred, gt)], 8)
    assert ious[7] == 0.0 and ious[0] == pytest.approx(0.75)
    assert miou == pytest.approx(0.375)


def test_dataset_level_is_not_mean_of_per_image() -> None:
    """Pixels are pooled over the set: a big image weighs more than a small one."""
    big_gt = np.ones((10, 10), np.uint8)
    big_pred = np.ones((10, 10), np.uint8)
    small_gt = np.ones((1, 2), np.uint8)
    small_pred = np.array([[1, 0]], np.uint8)
    miou, ious = dataset_miou([(big_pred, big_gt), (small_pred, small_gt)], 2)
    # class 1: tp 101, fn 1 -> 101/102 ; class 0: tp 0, fp 1 -> 0
    assert ious[1] == pytest.approx(101 / 102) and ious[0] == 0.0
    assert miou == pytest.approx(101 / 204)
    per_image = np.mean([1.0, (0.5 + 0.0) / 2])
    assert miou != pytest.approx(per_image)


def test_ignore_only_and_empty_inputs() -> None:
    gt = np.full((3, 3), 255, np.uint8)
    pred = np.zeros((3, 3), np.uint8)
    miou, ious = dataset_miou([(pred, gt)], 21)
    assert miou == 0.0 and np.isnan(ious).all()
    assert dataset_miou([], 21)[0] == 0.0


def test_values_outside_range_are_skipped_and_shapes_checked() -> None:
    gt = np.array([[0, 30]])
    pred = np.array([[0, 0]])
    assert confusion_matrix(pred, gt, 21).sum() == 1
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 21)


def test_gt_class_miou_ignores_a_spurious_predicted_class() -> None:
    """The issue's case: a spurious "sheep" (17) blob on a cow (10) image of a tiny set."""
    gt = np.zeros((100, 100), np.uint8)
    gt[20:80, 20:80] = 10  # cow, 3600 pixels
    pred = gt.copy()
    pred[20:30, 20:80] = 17  # 600 cow pixels predicted as sheep
    cm = confusion_matrix(pred, gt, 21)
    ious = iou_per_class(cm)
    # background: 6400/6400 = 1; cow: 3000/3600; sheep: 0 (only predicted)
    assert ious[17] == 0.0
    assert miou_from_confusion(cm) == pytest.approx((1 + 3000 / 3600 + 0) / 3)
    assert gt_class_miou(cm) == pytest.approx((1 + 3000 / 3600) / 2)
    # the clean prediction: both definitions agree
    clean = confusion_matrix(gt, gt, 21)
    assert gt_class_miou(clean) == miou_from_confusion(clean) == 1.0


def test_gt_class_miou_counts_a_missed_gt_class_as_zero() -> None:
    gt = np.array([[0, 0], [5, 5]])
    pred = np.zeros((2, 2), np.int64)
    cm = confusion_matrix(pred, gt, 8)
    # background: tp 2, fp 2 -> 0.5 ; class 5: in GT, never predicted -> 0
    assert gt_class_miou(cm) == pytest.approx(0.25)
    assert gt_class_miou(np.zeros((8, 8), np.int64)) == 0.0
