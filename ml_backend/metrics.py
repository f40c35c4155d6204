"""Segmentation metrics: confusion matrices and the dataset-level mIoU used everywhere in madseg.

Dataset-level mIoU: sum the C x C confusion matrix over the whole set (pixels whose ground truth
is the ignore index are left out), take IoU_k = TP_k / (TP_k + FP_k + FN_k) per class, and average
over the classes present in the ground truth or the prediction (those with a non-zero union).

Ground-truth-class mIoU (:func:`gt_class_miou`): the same IoUs averaged only over the classes that
have ground-truth pixels in the set. A class the model predicts but the set does not contain still
costs the true classes those pixels (they are false negatives there), but it does not add a
zero-IoU term to the mean. On a small set that term is what one spurious blob swings: 7 images,
one 1.2k-pixel "sheep" on a cow image takes the standard mIoU from 0.84 to 0.75, while the
ground-truth-class mIoU moves by the few pixels the blob took from "cow". The promotion gate
(:mod:`ml_backend.gate`) and the learning-rate choice on T(0) use it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .classes import IGNORE_INDEX


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Confusion matrix (C, C) int64 of one label-map pair; rows = ground truth, cols = prediction.

    ``pred`` and ``gt`` are integer arrays of the same shape (e.g. (H, W)). Pixels where ``gt`` is
    ``ignore_index`` (or either value is outside 0..C-1) are not counted.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    p = pred.reshape(-1).astype(np.int64)
    g = gt.reshape(-1).astype(np.int64)
    valid = (g != ignore_index) & (g >= 0) & (g < num_classes) & (p >= 0) & (p < num_classes)
    idx = g[valid] * num_classes + p[valid]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU (C,) float64 from a confusion matrix; NaN where the class is in neither map."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def miou_from_confusion(cm: np.ndarray) -> float:
    """Mean IoU over classes present in ground truth or prediction; 0.0 for an empty matrix."""
    ious = iou_per_class(cm)
    present = ~np.isnan(ious)
    return float(ious[present].mean()) if present.any() else 0.0


def gt_class_miou(cm: np.ndarray) -> float:
    """Mean IoU over the classes with ground-truth pixels in ``cm`` ((C, C), rows = ground truth).

    Classes only predicted (a spurious class absent from the ground truth) are left out of the
    mean; their pixels still count against the true class as false negatives. 0.0 when the matrix
    has no ground-truth pixel.
    """
    cm = np.asarray(cm, dtype=np.float64)
    ious = iou_per_class(cm)
    in_gt = cm.sum(axis=1) > 0
    return float(ious[in_gt].mean()) if in_gt.any() else 0.0


def dataset_miou(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[float, np.ndarray]:
    """Dataset-level mIoU over ``(pred, gt)`` label-map pairs (each (H, W)).

    Returns ``(miou, iou_per_class)`` with the per-class array of shape (C,) (NaN = absent).
    """
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, gt in pairs:
        cm += confusion_matrix(pred, gt, num_classes, ignore_index)
    return miou_from_confusion(cm), iou_per_class(cm)
